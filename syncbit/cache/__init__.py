"""The block cache: block files on disk, a SQLite index, LFRU eviction."""

from .cache import BlockCache, CacheStats

__all__ = ["BlockCache", "CacheStats"]
