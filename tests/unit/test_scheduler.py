"""Unit tests for syncbit.server.scheduler: a pure function from nodes and an assignment to placements."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from syncbit.errors import ConfigError
from syncbit.server.scheduler import (
    Assignment,
    NodeView,
    Placement,
    check_label,
    eligible,
    parse_selector,
    place,
)

GiB = 1 << 30


POOL = {"pool": "p"}  # a selector every node made by node() matches


def node(name: str, up: bool = True, free: int = 10 * GiB, held: dict | None = None, **labels: str) -> NodeView:
    return NodeView(name, {**POOL, **labels}, up, free, dict(held or {}))


def sel(replicas: int | None = None, spread_by: str | None = None, **selector: str) -> Assignment:
    return Assignment("ds", selector=dict(selector), replicas=replicas, spread_by=spread_by)


# -- Assignment validation ---------------------------------------------------------


def test_assignment_with_both_nodes_and_selector_is_refused():
    with pytest.raises(ConfigError, match="either node names or a label selector"):
        Assignment("ds", nodes=("a",), selector={"gpu": "h100"})


def test_assignment_with_neither_nodes_nor_selector_is_refused():
    with pytest.raises(ConfigError, match="either node names or a label selector"):
        Assignment("ds")


@pytest.mark.parametrize("replicas", [0, -1])
def test_assignment_replicas_below_one_is_refused(replicas):
    with pytest.raises(ConfigError, match="--replicas must be at least 1"):
        Assignment("ds", selector={"gpu": "h100"}, replicas=replicas)


def test_assignment_replicas_with_named_nodes_is_refused():
    with pytest.raises(ConfigError, match="go with --selector"):
        Assignment("ds", nodes=("a", "b"), replicas=1)


def test_assignment_spread_by_with_named_nodes_is_refused():
    with pytest.raises(ConfigError, match="go with --selector"):
        Assignment("ds", nodes=("a",), spread_by="zone")


def test_assignment_empty_nodes_tuple_is_refused():
    with pytest.raises(ConfigError, match="at least one node name"):
        Assignment("ds", nodes=())


@pytest.mark.parametrize("key", ["", "-gpu", "gpu-", "g pu", "gpu=", "a/b/c", "/gpu", "x" * 318, "é"])
def test_assignment_selector_with_bad_label_name_is_refused(key):
    with pytest.raises(ConfigError, match="not a valid label name"):
        Assignment("ds", selector={key: "v"})


@pytest.mark.parametrize("value", ["-v", "v-", "a b", "a/b", "x" * 64, "v,w"])
def test_assignment_selector_with_bad_label_value_is_refused(value):
    with pytest.raises(ConfigError, match="not a valid label value"):
        Assignment("ds", selector={"gpu": value})


@pytest.mark.parametrize("spread_by", ["", "zone=", "-zone", "a b", "a/b/c"])
def test_assignment_bad_spread_by_is_refused(spread_by):
    with pytest.raises(ConfigError, match="--spread-by"):
        Assignment("ds", selector={"gpu": "h100"}, spread_by=spread_by)


def test_assignment_valid_forms_are_accepted():
    """Named nodes; a selector with prefixed keys, an empty value, replicas and spread_by."""
    Assignment("ds", nodes=("a", "b"))
    a = Assignment("ds", selector={"example.com/gpu": "h100", "tier": "", "z_1.x": "A-1_b.c"}, replicas=2,
                   spread_by="topology.kubernetes.io/zone")
    assert a.replicas == 2 and a.spread_by == "topology.kubernetes.io/zone"


def test_check_label_limits_key_length_to_317_and_value_to_63():
    check_label("a" * 253 + "/" + "b" * 63, "v" * 63)
    with pytest.raises(ConfigError):
        check_label("a" * 254 + "/" + "b" * 63, "v")
    with pytest.raises(ConfigError):
        check_label("k", "v" * 64)


def test_check_label_refuses_non_strings():
    with pytest.raises(ConfigError):
        check_label(1, "v")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        check_label("k", 1)  # type: ignore[arg-type]


def test_check_label_refuses_trailing_newline():
    """'zone\\n' is not a label name and 'a\\n' is not a label value."""
    with pytest.raises(ConfigError):
        check_label("zone\n", "a")
    with pytest.raises(ConfigError):
        check_label("zone", "a\n")


def test_assignment_empty_selector_is_refused():
    """An empty selector would match every node; parse_selector refuses it, so must the Assignment."""
    with pytest.raises(ConfigError):
        Assignment("ds", selector={})


# -- parse_selector ----------------------------------------------------------------


def test_parse_selector_simple_pairs():
    assert parse_selector("gpu=h100,zone=a") == {"gpu": "h100", "zone": "a"}


def test_parse_selector_strips_spaces_around_items_keys_and_values():
    assert parse_selector("  gpu = h100 ,  zone=a  ") == {"gpu": "h100", "zone": "a"}


def test_parse_selector_ignores_trailing_and_empty_items():
    assert parse_selector("gpu=h100,,zone=a,") == {"gpu": "h100", "zone": "a"}
    assert parse_selector(",gpu=h100, ,") == {"gpu": "h100"}


def test_parse_selector_duplicate_key_with_same_value_is_collapsed():
    assert parse_selector("gpu=h100,gpu=h100") == {"gpu": "h100"}


def test_parse_selector_duplicate_key_with_different_values_is_refused():
    with pytest.raises(ConfigError, match="twice with different values"):
        parse_selector("gpu=h100,gpu=a100")


@pytest.mark.parametrize("text", ["gpu", "gpu=h100,zone", "gpu:h100"])
def test_parse_selector_item_without_equals_is_refused(text):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_selector(text)


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_parse_selector_empty_is_refused(text):
    with pytest.raises(ConfigError, match="empty selector"):
        parse_selector(text)


def test_parse_selector_empty_value_is_allowed_and_empty_key_refused():
    assert parse_selector("tier=") == {"tier": ""}
    with pytest.raises(ConfigError, match="label name"):
        parse_selector("=h100")


def test_parse_selector_value_containing_equals_is_refused():
    """Only the first '=' splits: 'a=b=c' gives the value 'b=c', which is not a valid value."""
    with pytest.raises(ConfigError, match="label value"):
        parse_selector("a=b=c")


def test_parse_selector_keeps_prefixed_keys():
    assert parse_selector("example.com/gpu=h100") == {"example.com/gpu": "h100"}


# -- eligible ----------------------------------------------------------------------


def test_eligible_down_node_says_down():
    assert eligible(node("a", up=False, gpu="h100"), sel(gpu="h100"), 1) == "down"


def test_eligible_requires_every_selector_label_to_match():
    a = sel(gpu="h100", zone="a")
    assert eligible(node("n", gpu="h100", zone="a", extra="x"), a, 1) is None
    assert eligible(node("n", gpu="h100", zone="b"), a, 1) == "labels do not match"
    assert eligible(node("n", gpu="h100"), a, 1) == "labels do not match"  # a missing label does not match
    assert eligible(node("n"), a, 1) == "labels do not match"


def test_eligible_free_space_counts_bytes_already_held():
    a = sel(gpu="h100")
    assert eligible(node("n", free=100, gpu="h100"), a, 100) is None  # exactly fits
    assert eligible(node("n", free=99, gpu="h100"), a, 100) == "needs 100 bytes, has 99 free"
    assert eligible(node("n", free=40, held={"ds": 60}, gpu="h100"), a, 100) is None
    assert eligible(node("n", free=39, held={"ds": 60}, gpu="h100"), a, 100) == "needs 40 bytes, has 39 free"
    assert eligible(node("n", free=0, held={"ds": 100}, gpu="h100"), a, 100) is None  # holds it all
    # bytes held of another dataset do not count
    assert eligible(node("n", free=40, held={"other": 60}, gpu="h100"), a, 100) == "needs 100 bytes, has 40 free"


def test_eligible_down_is_reported_before_labels_and_space():
    assert eligible(node("n", up=False, free=0), sel(gpu="h100"), 100) == "down"
    assert eligible(node("n", free=0), sel(gpu="h100"), 100) == "labels do not match"


# -- named nodes -------------------------------------------------------------------


def test_named_nodes_are_placed_in_given_order_even_when_down():
    nodes = [node("a", up=False, free=0), node("b")]
    p = place(Assignment("ds", nodes=("b", "a")), nodes, 100 * GiB)
    assert p == Placement(("b", "a"), None)


def test_named_unknown_nodes_are_placed_with_a_problem():
    p = place(Assignment("ds", nodes=("a", "ghost", "zzz")), [node("a")], 1)
    assert p.nodes == ("a", "ghost", "zzz")
    assert p.problem == "not registered: ghost, zzz"


def test_named_nodes_with_no_nodes_registered_at_all():
    p = place(Assignment("ds", nodes=("a",)), [], 1)
    assert p == Placement(("a",), "not registered: a")


def test_named_duplicate_nodes_are_collapsed_keeping_first_position():
    p = place(Assignment("ds", nodes=("b", "a", "b", "a")), [node("a"), node("b")], 1)
    assert p == Placement(("b", "a"), None)


def test_named_nodes_ignore_current_placements():
    p = place(Assignment("ds", nodes=("a",)), [node("a"), node("b")], 1, current={"b"})
    assert p.nodes == ("a",)


# -- selector, replicas=None -------------------------------------------------------


def test_selector_without_replicas_places_on_every_eligible_node_sorted():
    nodes = [node("c", gpu="h100"), node("a", gpu="h100"), node("b", gpu="a100"),
             node("d", up=False, gpu="h100"), node("e", free=1, gpu="h100")]
    assert place(sel(gpu="h100"), nodes, 100) == Placement(("a", "c"), None)


def test_selector_without_replicas_no_eligible_node_names_the_reasons():
    nodes = [node("a", up=False, gpu="h100"), node("b", gpu="a100"), node("c", free=1, gpu="h100")]
    p = place(sel(gpu="h100"), nodes, 100)
    assert p.nodes == ()
    assert p.problem == "no eligible node (down: 1, labels do not match: 1, too little space: 1)"


def test_no_nodes_at_all_gives_empty_placement_with_problem():
    for a in (sel(gpu="h100"), sel(replicas=2, gpu="h100"), sel(replicas=1, spread_by="zone", gpu="h100")):
        p = place(a, [], 100)
        assert p == Placement((), "no eligible node (no nodes registered)")


# -- replicas ----------------------------------------------------------------------


def test_replicas_picks_exactly_that_many():
    nodes = [node(f"n{i}", gpu="h100") for i in range(5)]
    p = place(sel(replicas=3, gpu="h100"), nodes, 100)
    assert len(p.nodes) == 3 and p.problem is None
    assert list(p.nodes) == sorted(p.nodes)


def test_replicas_prefers_nodes_holding_more_of_the_dataset():
    nodes = [node("a", gpu="h100"), node("b", held={"ds": 50}, gpu="h100"), node("c", held={"ds": 90}, gpu="h100")]
    assert place(sel(replicas=2, gpu="h100"), nodes, 100).nodes == ("b", "c")


def test_replicas_then_prefers_most_free_space_then_name():
    nodes = [node("a", free=100), node("b", free=300), node("c", free=200), node("d", free=300)]
    assert place(Assignment("ds", selector=POOL, replicas=1), nodes, 10).nodes == ("b",)
    assert place(Assignment("ds", selector=POOL, replicas=2), nodes, 10).nodes == ("b", "d")
    same = [node(n, free=100) for n in ("z", "m", "c")]
    assert place(Assignment("ds", selector=POOL, replicas=1), same, 10).nodes == ("c",)


def test_fewer_eligible_than_replicas_gives_partial_placement_with_reasons():
    nodes = [node("ok", gpu="h100"), node("down", up=False, gpu="h100"), node("cpu", gpu="none"),
             node("cpu2", gpu="none"), node("small", free=10, gpu="h100")]
    p = place(sel(replicas=3, gpu="h100"), nodes, 100)
    assert p.nodes == ("ok",)
    assert p.problem == "only 1 of 3 replicas placeable (down: 1, labels do not match: 2, too little space: 1)"


def test_replicas_with_no_eligible_node_uses_no_eligible_message():
    nodes = [node("a", up=False, gpu="h100")]
    p = place(sel(replicas=2, gpu="h100"), nodes, 1)
    assert p == Placement((), "no eligible node (down: 1)")


def test_partial_placement_when_all_nodes_eligible_does_not_claim_no_nodes_registered():
    nodes = [node("a", gpu="h100"), node("b", gpu="h100")]
    p = place(sel(replicas=3, gpu="h100"), nodes, 1)
    assert p.nodes == ("a", "b")
    assert p.problem is not None and p.problem.startswith("only 2 of 3 replicas placeable")
    assert "no nodes registered" not in p.problem


# -- spread ------------------------------------------------------------------------


def test_spread_places_one_per_domain_before_a_second():
    nodes = [node("a1", zone="a", held={"ds": 99}), node("a2", zone="a", held={"ds": 98}),
             node("a3", zone="a", held={"ds": 97}), node("b1", zone="b"), node("c1", zone="c")]
    # Without spread the held bytes win: all three in zone a.
    assert place(Assignment("ds", selector=POOL, replicas=3), nodes, 100).nodes == ("a1", "a2", "a3")
    # With spread: one per zone, the best in each.
    assert place(Assignment("ds", selector=POOL, replicas=3, spread_by="zone"), nodes, 100).nodes == ("a1", "b1", "c1")
    # A fourth goes to the best remaining node.
    assert place(Assignment("ds", selector=POOL, replicas=4, spread_by="zone"), nodes, 100).nodes \
        == ("a1", "a2", "b1", "c1")


def test_spread_nodes_without_the_label_form_their_own_domain():
    nodes = [node("a1", zone="a", held={"ds": 99}), node("a2", zone="a", held={"ds": 98}), node("x"), node("y")]
    p = place(Assignment("ds", selector=POOL, replicas=2, spread_by="zone"), nodes, 100)
    assert p.nodes == ("a1", "x")  # one in zone a, one among the unlabelled
    p = place(Assignment("ds", selector=POOL, replicas=4, spread_by="zone"), nodes, 100)
    assert p.nodes == ("a1", "a2", "x", "y")


def test_spread_combined_with_selector_only_counts_eligible_nodes():
    nodes = [node("a1", zone="a", gpu="h100"), node("a2", zone="a", gpu="h100"), node("b1", zone="b", gpu="a100"),
             node("c1", zone="c", gpu="h100", up=False)]
    p = place(sel(replicas=2, spread_by="zone", gpu="h100"), nodes, 1)
    assert p.nodes == ("a1", "a2")
    assert p.problem is None


# -- stickiness --------------------------------------------------------------------


def test_current_placements_are_kept_even_when_a_better_node_exists():
    nodes = [node("old", free=1 * GiB), node("new", free=100 * GiB, held={"ds": 50})]
    a = Assignment("ds", selector=POOL, replicas=1)
    assert place(a, nodes, 100).nodes == ("new",)  # from scratch the better node wins
    assert place(a, nodes, 100, current={"old"}).nodes == ("old",)


def test_current_placements_are_kept_even_against_spread():
    nodes = [node("a1", zone="a"), node("a2", zone="a"), node("b1", zone="b")]
    a = Assignment("ds", selector=POOL, replicas=2, spread_by="zone")
    assert place(a, nodes, 1).nodes == ("a1", "b1")
    assert place(a, nodes, 1, current={"a1", "a2"}).nodes == ("a1", "a2")


def test_current_node_that_goes_down_is_replaced():
    nodes = [node("a", up=False), node("b"), node("c", free=20 * GiB)]
    p = place(Assignment("ds", selector=POOL, replicas=2), nodes, 1, current={"a", "b"})
    assert p == Placement(("b", "c"), None)


def test_current_node_that_stops_matching_is_replaced():
    nodes = [node("a", gpu="a100"), node("b", gpu="h100"), node("c", gpu="h100")]
    p = place(sel(replicas=2, gpu="h100"), nodes, 1, current={"a", "b"})
    assert p == Placement(("b", "c"), None)


def test_current_node_that_runs_out_of_space_is_replaced():
    nodes = [node("a", free=10, held={"ds": 50}), node("b", free=1000)]
    a = Assignment("ds", selector=POOL, replicas=1)
    assert place(a, nodes, 60, current={"a"}).nodes == ("a",)  # needs 10, has 10
    assert place(a, nodes, 61, current={"a"}).nodes == ("b",)  # needs 11, has 10


def test_current_unknown_node_is_ignored():
    p = place(Assignment("ds", selector=POOL, replicas=1), [node("a")], 1, current={"ghost"})
    assert p == Placement(("a",), None)


def test_current_larger_than_replicas_keeps_only_replicas_of_them():
    nodes = [node(n) for n in ("a", "b", "c", "d")]
    p = place(Assignment("ds", selector=POOL, replicas=2), nodes, 1, current={"b", "c", "d"})
    assert len(p.nodes) == 2 and set(p.nodes) <= {"b", "c", "d"}
    assert p.problem is None


def test_replicas_none_ignores_current():
    nodes = [node("a"), node("b", up=False)]
    assert place(Assignment("ds", selector=POOL), nodes, 1, current={"b"}).nodes == ("a",)


# -- determinism -------------------------------------------------------------------


def test_same_input_same_output_whatever_the_node_order():
    rng = random.Random(1234)
    nodes = [node(f"n{i:02}", free=rng.choice([10, 100, 1000]), held={"ds": rng.choice([0, 0, 5])},
                  zone=rng.choice("abc")) for i in range(20)]
    a = Assignment("ds", selector=POOL, replicas=7, spread_by="zone")
    first = place(a, nodes, 50)
    for _ in range(20):
        shuffled = nodes[:]
        rng.shuffle(shuffled)
        assert place(a, shuffled, 50) == first
    assert list(first.nodes) == sorted(first.nodes)


def test_full_ties_are_broken_by_name():
    nodes = [node(n) for n in ("delta", "alpha", "charlie", "bravo")]
    assert place(Assignment("ds", selector=POOL, replicas=2), nodes, 1).nodes == ("alpha", "bravo")
    assert place(Assignment("ds", selector=POOL, replicas=2), nodes[::-1], 1).nodes == ("alpha", "bravo")


# -- properties over random inputs ----------------------------------------------------


def _random_case(rng: random.Random):
    zones = ["a", "b", "c", "d"][: rng.randint(1, 4)]
    nodes = []
    for i in range(rng.randint(0, 15)):
        labels = {"pool": "p"}
        if rng.random() < 0.8:
            labels["zone"] = rng.choice(zones)
        labels["gpu"] = rng.choice(["h100", "h100", "a100"])
        nodes.append(NodeView(f"n{i}", labels, rng.random() < 0.8, rng.choice([0, 50, 100, 500]),
                              {"ds": rng.choice([0, 0, 30, 100])}))
    a = Assignment("ds", selector={"gpu": "h100"} if rng.random() < 0.7 else {"pool": "p"}, replicas=rng.randint(1, 6),
                   spread_by="zone" if rng.random() < 0.6 else None)
    current = {n.name for n in nodes if rng.random() < 0.3} | ({"ghost"} if rng.random() < 0.2 else set())
    return a, nodes, rng.choice([0, 50, 100, 200]), current


@pytest.mark.parametrize("seed", range(5))
def test_property_placement_is_eligible_bounded_and_as_full_as_possible(seed):
    """Never a down/ineligible node, never more than replicas, exactly min(replicas, #eligible), stable order."""
    rng = random.Random(seed)
    for _ in range(200):
        a, nodes, size, current = _random_case(rng)
        p = place(a, nodes, size, current)
        by_name = {n.name: n for n in nodes}
        ok = {n.name for n in nodes if eligible(n, a, size) is None}
        assert set(p.nodes) <= ok
        assert all(by_name[n].up for n in p.nodes)
        assert len(p.nodes) == len(set(p.nodes)) == min(a.replicas, len(ok))
        assert list(p.nodes) == sorted(p.nodes)
        assert (p.problem is None) == (len(p.nodes) == a.replicas)
        # stickiness: eligible current nodes are kept while they fit in the replica count
        kept = ok & current
        if len(kept) <= a.replicas:
            assert kept <= set(p.nodes)
        else:
            assert set(p.nodes) <= kept
        assert place(a, nodes, size, current) == p  # deterministic


@pytest.mark.parametrize("seed", range(5))
def test_property_replicas_none_is_exactly_the_eligible_nodes(seed):
    rng = random.Random(100 + seed)
    for _ in range(200):
        a, nodes, size, current = _random_case(rng)
        a = Assignment("ds", selector=a.selector)
        p = place(a, nodes, size, current)
        assert p.nodes == tuple(sorted(n.name for n in nodes if eligible(n, a, size) is None))
        assert (p.problem is None) == bool(p.nodes)


@pytest.mark.parametrize("seed", range(5))
def test_property_spread_is_even_when_every_domain_has_enough_nodes(seed):
    """From no current placement, with at least `replicas` eligible nodes per domain, domain counts differ by <= 1."""
    rng = random.Random(200 + seed)
    for _ in range(100):
        replicas = rng.randint(1, 8)
        domains = ["a", "b", "c", None][: rng.randint(1, 4)]
        nodes = []
        for d in domains:
            for j in range(replicas + rng.randint(0, 2)):
                labels = {"zone": d, **POOL} if d is not None else dict(POOL)
                nodes.append(NodeView(f"{d}-{j}", labels, True, rng.choice([100, 200, 300]),
                                      {"ds": rng.choice([0, 10, 20])}))
            nodes.append(NodeView(f"{d}-down", {"zone": d, **POOL} if d else dict(POOL), False, 1000))  # never chosen
        rng.shuffle(nodes)
        a = Assignment("ds", selector=POOL, replicas=replicas, spread_by="zone")
        p = place(a, nodes, 100)
        assert len(p.nodes) == replicas and p.problem is None
        by_name = {n.name: n for n in nodes}
        counts = Counter(by_name[n].labels.get("zone", "") for n in p.nodes)
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(counts) == min(replicas, len(domains))


@pytest.mark.parametrize("seed", range(5))
def test_property_spread_only_uneven_when_smaller_domains_are_exhausted(seed):
    """From no current placement: a domain holding fewer than (max - 1) replicas has no unused eligible node."""
    rng = random.Random(300 + seed)
    for _ in range(200):
        a, nodes, size, _ = _random_case(rng)
        a = Assignment("ds", selector=a.selector, replicas=a.replicas, spread_by="zone")
        p = place(a, nodes, size)
        dom = {n.name: n.labels.get("zone", "") for n in nodes}
        ok = [n.name for n in nodes if eligible(n, a, size) is None]
        counts = Counter(dom[n] for n in p.nodes)
        if not counts:
            continue
        top = max(counts.values())
        for d in {dom[n] for n in ok}:
            if counts.get(d, 0) < top - 1:
                assert all(n in p.nodes for n in ok if dom[n] == d), (d, counts, p.nodes)
