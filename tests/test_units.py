import pytest
from hypothesis import given
from hypothesis import strategies as st

from memfit.units import Budget, format_bytes, parse_budget, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12GiB", 12 * 2**30),
        ("800MB", 800 * 10**6),
        ("1.5 KiB", 1536),
        ("2g", 2 * 2**30),
        ("512", 512),
        (" 3 mib ", 3 * 2**20),
        (4096, 4096),
        (1e3, 1000),
    ],
)
def test_parse_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["twelve", "12 parsecs", "-5GiB", "", "GiB"])
def test_malformed_sizes_name_valid_examples(bad: str) -> None:
    with pytest.raises(ValueError, match="12GiB"):
        parse_bytes(bad)


def test_wrong_types() -> None:
    with pytest.raises(TypeError, match="byte count"):
        parse_bytes(True)
    with pytest.raises(TypeError, match="byte count"):
        parse_bytes([1])  # type: ignore[arg-type]


def test_budgets() -> None:
    assert parse_budget("40%") == Budget(fraction=0.4)
    assert parse_budget("12GiB") == Budget(bytes=12 * 2**30)
    assert parse_budget(100) == Budget(bytes=100)
    assert parse_budget("40%").resolve(held_bytes=1000, activation_bytes=500) == 1200
    assert parse_budget(5000).resolve(held_bytes=1000, activation_bytes=500) == 5000
    assert str(parse_budget("40%")) == "40%"


@pytest.mark.parametrize("bad", ["forty%", "%", "-3%", "12 furlongs"])
def test_malformed_budgets(bad: str) -> None:
    with pytest.raises(ValueError, match=r"40%|12GiB"):
        parse_budget(bad)


def test_budget_needs_exactly_one_kind() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(bytes=1, fraction=0.5)


def test_format_bytes() -> None:
    assert format_bytes(100) == "100 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"


@given(st.integers(min_value=0, max_value=2**50))
def test_integers_round_trip(n: int) -> None:
    assert parse_bytes(str(n)) == n
