"""Where the checkout is: tests run scripts and command lines from its root."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
