"""Sources: where bytes come from. One abstract class, a registry by URI scheme."""

from .base import Sink, Source, open_source, known_schemes

__all__ = ["Sink", "Source", "open_source", "known_schemes"]
