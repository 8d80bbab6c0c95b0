"""Packaging entry point.

`pip install .` / `pip install -e .` install the pure-Python package and compile nothing:
the compiled extension `mmkern._C` (csrc/) is built on demand, never as a side effect of
installing. Metadata and extras live in pyproject.toml.
"""
from setuptools import setup

setup()
