"""The package version (one place, read by the manifest writer)."""

__version__ = "0.1.0"
