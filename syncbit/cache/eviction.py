"""LFRU eviction order (pure; no I/O).

Blocks are split in two segments. A block touched once is *probationary* and
leaves first, least recently used first: a dataset streamed through once does
not flush the working set. A block touched at least ``PROTECT_HITS`` times is
*protected* and leaves only after every probationary block, least frequently
used first, where frequency decays with a half-life so that yesterday's hot
data can still age out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PROTECT_HITS = 2.0


@dataclass(frozen=True)
class BlockStat:
    id: str
    size: int
    last_access: float
    hits: float


def decayed_hits(stat: BlockStat, now: float, half_life: float) -> float:
    age = max(0.0, now - stat.last_access)
    return stat.hits * 0.5 ** (age / half_life)


def eviction_order(stats: Iterable[BlockStat], now: float, half_life: float = 3600.0) -> list[BlockStat]:
    def key(s: BlockStat):
        freq = decayed_hits(s, now, half_life)
        protected = freq >= PROTECT_HITS
        return (protected, freq if protected else 0.0, s.last_access)

    return sorted(stats, key=key)


def select_victims(stats: Iterable[BlockStat], need_bytes: int, now: float, half_life: float = 3600.0) -> list[str]:
    victims: list[str] = []
    freed = 0
    for s in eviction_order(stats, now, half_life):
        if freed >= need_bytes:
            break
        victims.append(s.id)
        freed += s.size
    return victims
