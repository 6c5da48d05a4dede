"""Unit tests for syncbit.cache.eviction: LFRU order and victim selection."""

from __future__ import annotations

import pytest

from syncbit.cache.eviction import PROTECT_HITS, BlockStat, decayed_hits, eviction_order, select_victims

NOW = 1_000_000.0
HOUR = 3600.0


def st(id: str, hits: float, age: float, size: int = 100) -> BlockStat:
    return BlockStat(id=id, size=size, last_access=NOW - age, hits=hits)


def order(stats, half_life=HOUR):
    return [s.id for s in eviction_order(stats, NOW, half_life)]


def test_read_once_leaves_before_read_many_even_if_more_recent():
    # The once-read block is the most recent; the hot one was read a while ago.
    once = st("once", hits=1, age=1)
    hot = st("hot", hits=20, age=600)
    assert order([hot, once]) == ["once", "hot"]
    assert select_victims([hot, once], 100, NOW) == ["once"]


def test_a_streamed_dataset_does_not_flush_the_working_set():
    # 50 blocks streamed once just now vs 5 blocks read every hour: the stream goes first.
    stream = [st(f"s{i}", hits=1, age=i) for i in range(50)]
    working = [st(f"w{i}", hits=10, age=HOUR / 2) for i in range(5)]
    victims = select_victims(working + stream, 50 * 100, NOW)
    assert set(victims) == {s.id for s in stream}


def test_once_read_blocks_leave_in_lru_order():
    stats = [st("mid", 1, 50), st("new", 1, 5), st("old", 1, 500), st("never", 0, 100)]
    assert order(stats) == ["old", "never", "mid", "new"]


def test_protected_blocks_leave_least_frequently_used_first():
    stats = [st("f10", 10, 10), st("f3", 3, 10), st("f50", 50, 10), st("once", 1, 10)]
    assert order(stats) == ["once", "f3", "f10", "f50"]


def test_decay_lets_old_hot_data_age_out():
    # 100 hits ten half-lives ago decay to under 0.1: below a block read once a minute ago.
    old_hot = st("old-hot", hits=100, age=10 * HOUR)
    recent = st("recent", hits=1, age=60)
    assert decayed_hits(old_hot, NOW, HOUR) == pytest.approx(100 / 1024)
    assert order([recent, old_hot]) == ["old-hot", "recent"]
    # With a long half-life the same block is still protected.
    assert order([recent, old_hot], half_life=100 * HOUR) == ["recent", "old-hot"]


def test_protection_threshold():
    just = st("just", hits=PROTECT_HITS, age=0)
    below = st("below", hits=PROTECT_HITS - 0.01, age=0)
    older_once = st("older", hits=1, age=1000)
    # 'below' is probationary and more recent than 'older'; 'just' is protected.
    assert order([just, below, older_once]) == ["older", "below", "just"]


def test_decayed_hits_ignores_future_timestamps():
    # A last_access in the future (clock stepped back) must not inflate frequency.
    assert decayed_hits(st("f", 4, age=-HOUR), NOW, HOUR) == 4


@pytest.mark.parametrize("need", [1, 99, 100, 101, 250, 300])
def test_select_victims_frees_at_least_what_is_needed(need):
    stats = [st("a", 1, 30, size=100), st("b", 1, 20, size=100), st("c", 1, 10, size=100)]
    victims = select_victims(stats, need, NOW)
    sizes = {s.id: s.size for s in stats}
    freed = sum(sizes[v] for v in victims)
    assert freed >= need
    # ...and no more blocks than needed: dropping the last victim would free too little.
    assert freed - sizes[victims[-1]] < need
    assert victims == ["a", "b", "c"][: len(victims)]


def test_select_victims_with_uneven_sizes():
    stats = [st("small", 1, 30, size=10), st("big", 1, 20, size=1000), st("hot", 9, 10, size=10)]
    assert select_victims(stats, 500, NOW) == ["small", "big"]


def test_select_victims_edge_cases():
    stats = [st("a", 1, 1)]
    assert select_victims(stats, 0, NOW) == []           # nothing needed
    assert select_victims([], 10**9, NOW) == []          # nothing to evict
    assert select_victims(stats, 10**9, NOW) == ["a"]    # need more than exists: everything, once
