"""Build script for a plain `pip install .`; the metadata lives in setup.cfg."""
from setuptools import setup

setup()
