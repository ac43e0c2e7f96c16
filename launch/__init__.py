"""Launching experiments (a config, overrides and a sweep) locally or on Cloud TPU: launch.py.

Launching works from a checkout of the repository (it archives and ships the checked-out commit).
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
