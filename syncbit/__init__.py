"""Syncbit: datasets on a lazy, read-only FUSE mount over a content-addressed block cache."""

__version__ = "0.1.0"
