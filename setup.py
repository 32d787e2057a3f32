"""Shim so that the historical `python3 setup.py develop` keeps working; metadata lives in pyproject.toml."""
from setuptools import setup

setup()
