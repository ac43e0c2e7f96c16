"""Launching experiments (a config, overrides and a sweep) locally or on Cloud TPU: launch.py."""
