"""The single place the package version is written (setup.py reads it too)."""
__version__ = "0.1.0"
