"""How a probability reads to a person: never rounded onto 0% or 100%."""

from __future__ import annotations

import math

import pytest

from workbench.predict.results import probability_text


def test_a_probability_near_a_bound_is_never_shown_as_the_bound() -> None:
    assert probability_text(0.9996) == ">99%"
    assert probability_text(0.0004) == "<1%"
    assert probability_text(0.995) == ">99%"  # would round to "100%"
    assert probability_text(0.005) == "<1%"  # would round to "1%" or "0%"


def test_exact_bounds_read_as_the_bounds() -> None:
    assert probability_text(1.0) == "100%"
    assert probability_text(0.0) == "0%"
    assert probability_text(1 + 1e-9) == "100%"  # clipped, not "101%"
    assert probability_text(-1e-9) == "0%"


@pytest.mark.parametrize(
    ("p", "text"), [(0.01, "1%"), (0.125, "13%"), (0.5, "50%"), (0.9, "90%"), (0.99, "99%")]
)
def test_in_between_is_the_nearest_whole_percent(p: float, text: str) -> None:
    assert probability_text(p) == text


def test_a_missing_probability_reads_not_available() -> None:
    assert probability_text(None) == "n/a"
    assert probability_text(math.nan) == "n/a"


def test_no_probability_strictly_inside_the_bounds_reads_zero_or_hundred() -> None:
    for i in range(1, 100_000):
        assert probability_text(i / 100_000) not in ("0%", "100%")
