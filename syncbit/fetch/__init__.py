"""The read path: single-flight block fetches from a source into the cache."""

from .fetcher import Fetcher

__all__ = ["Fetcher"]
