"""Unit tests for syncbit.units: human sizes and durations."""

from __future__ import annotations

import math

import pytest

from syncbit.errors import ConfigError
from syncbit.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    "text,value",
    [
        ("4MiB", 4 * 2**20),
        ("4 MiB", 4 * 2**20),
        ("4mib", 4 * 2**20),
        ("500GiB", 500 * 2**30),
        ("1TiB", 2**40),
        ("1.5KiB", 1536),
        ("64k", 64_000),
        ("2MB", 2_000_000),
        ("3G", 3 * 10**9),
        ("1073741824", 2**30),
        ("17b", 17),
        ("  8 KiB  ", 8192),
        (0, 0),
        (4096, 4096),
        (2.0, 2),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",            # nothing at all
        "MiB",         # unit without a number
        "4 parsecs",   # unknown unit
        "4MiBs",       # unit with trailing junk
        "80%",         # a percentage is not a size here (only cache_quota takes one)
        "-4MiB",       # negative size given as text
        "1e9",         # exponent notation is not a documented form
        "4,5MiB",      # decimal comma
        "0x10",        # hex
        True,          # a YAML boolean ("size: yes") must not become 1 byte
        None,          # a YAML null
        "4MiB; rm -rf /",  # junk after a valid size
    ],
)
def test_parse_size_rejects_garbage(text):
    with pytest.raises(ConfigError) as ei:
        parse_size(text, key="block_size")
    assert "block_size" in str(ei.value)



@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-1, id="negative-int"),
        pytest.param(float("nan"), id="nan"),
        pytest.param(float("inf"), id="inf"),
        pytest.param("9" * 400, id="huge-text"),
    ],
)
def test_parse_size_rejects_non_finite_and_negative_numbers(value):
    # Hostile numbers as YAML would hand them over (-1, .nan, .inf, 1e400, 400 digits).
    with pytest.raises(ConfigError):
        parse_size(value, key="min_free_disk")


@pytest.mark.parametrize(
    "text,value",
    [("5s", 5.0), ("2m", 120.0), ("500ms", 0.5), ("1h", 3600.0), ("1d", 86400.0), ("1.5s", 1.5),
     ("30", 30.0), (7, 7.0), (0.25, 0.25), (" 3 S ", 3.0)],
)
def test_parse_duration(text, value):
    assert parse_duration(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "s", "5 fortnights", "-5s", "5s5", "1e3s", True, None])
def test_parse_duration_rejects_garbage(text):
    # Unknown units, signs, exponent notation, YAML booleans and nulls.
    with pytest.raises(ConfigError) as ei:
        parse_duration(text, key="fetch_deadline")
    assert "fetch_deadline" in str(ei.value)



@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-5, id="negative"),
        pytest.param(float("nan"), id="nan"),
    ],
)
def test_parse_duration_rejects_negative_and_nan(value):
    # A negative/NaN deadline as YAML would give it.
    with pytest.raises(ConfigError):
        parse_duration(value, key="fetch_deadline")


def test_size_and_duration_units_differ_for_m():
    # 'm' is mega for sizes and minutes for durations.
    assert parse_size("1m") == 10**6
    assert parse_duration("1m") == 60.0


@pytest.mark.parametrize(
    "n,text",
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (4 * 2**20, "4.0 MiB"),
     (500 * 2**30, "500.0 GiB"), (5 * 2**40, "5.0 TiB"), (2**50, "1024.0 TiB"), (-2048, "-2.0 KiB")],
)
def test_format_size(n, text):
    assert format_size(n) == text


def test_format_size_round_trips_through_parse_size():
    for n in (2**20, 3 * 2**30, 7 * 2**40):
        assert parse_size(format_size(n).replace(" ", "")) == n
    assert math.isclose(parse_size("1.5KiB"), 1536)
