"""Sources: where bytes come from. One abstract class, a registry by URI scheme."""

from .base import Sink, Source, known_schemes, open_source, preload_sources, source_key

__all__ = ["Sink", "Source", "known_schemes", "open_source", "preload_sources", "source_key"]
