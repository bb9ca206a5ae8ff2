"""polyfuse: fuse heterogeneous language models into one pivot model."""

__version__ = "0.1.0"
