import pytest
from hypothesis import given
from hypothesis import strategies as st

from memfit.units import Budget, format_bytes, infeasible_message, parse_budget, parse_bytes


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


@pytest.mark.parametrize("bad", ["twelve", "12 parsecs", "-5GiB", "", "GiB", "1e400", "1e300TiB"])
def test_malformed_sizes_name_valid_examples(bad: str) -> None:
    with pytest.raises(ValueError, match="12GiB"):
        parse_bytes(bad)


def test_infinite_numbers_are_no_sizes() -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_bytes(float("inf"))


def test_wrong_types() -> None:
    with pytest.raises(TypeError, match="byte count"):
        parse_bytes(True)
    with pytest.raises(TypeError, match="byte count"):
        parse_bytes([1])  # type: ignore[arg-type]


def test_budgets() -> None:
    assert parse_budget("40%") == Budget(fraction=0.4)
    assert parse_budget("12GiB") == Budget(bytes=12 * 2**30)
    assert parse_budget(100) == Budget(bytes=100)
    assert parse_budget("40%").resolve(base_bytes=1000, activation_bytes=500) == 1200
    assert parse_budget(5000).resolve(base_bytes=1000, activation_bytes=500) == 5000
    assert str(parse_budget("40%")) == "40%"


@pytest.mark.parametrize(
    "bad", ["forty%", "%", "-3%", "12 furlongs", "inf%", "nan%", "0%", "0", 0, "0GiB", "1e400"]
)
def test_malformed_budgets(bad: str) -> None:
    # infinite, NaN, zero and negative budgets are refused here, before anything is measured
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


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.4, Budget(fraction=0.4)),
        (1.0, Budget(fraction=1.0)),
        ("0.4", Budget(fraction=0.4)),
        (12e9, Budget(bytes=12 * 10**9)),
        (4096.0, Budget(bytes=4096)),
        ("4096", Budget(bytes=4096)),
    ],
)
def test_numbers_as_budgets(value: object, expected: Budget) -> None:
    """A float in (0, 1] is a fraction (it silently became 0 bytes before), a whole one bytes."""
    assert parse_budget(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0.0, 2.5, -0.4, float("nan"), float("inf"), "1.5", "0.0"])
def test_other_numbers_are_refused_naming_the_forms(bad: object) -> None:
    with pytest.raises(ValueError, match=r"cannot read budget .*\(0, 1\].*40%.*12GiB"):
        parse_budget(bad)  # type: ignore[arg-type]


def test_infeasible_message_in_the_users_units() -> None:
    held, activation, smallest = 1 << 20, 2 << 20, (1 << 20) + 1_300_000
    fraction = Budget(fraction=0.4)
    text = infeasible_message(
        fraction, fraction.resolve(held, activation), smallest, held, activation
    )
    assert text.startswith("budget 40% of 2.00 MiB activation memory = 819.20 KiB")
    assert "smallest feasible is 1.24 MiB of activation memory = 62%" in text
    assert Budget(fraction=0.62).resolve(held, activation) >= smallest  # the advice works
    assert Budget(fraction=0.61).resolve(held, activation) < smallest  # and is the least
    text = infeasible_message(Budget(bytes=2 << 20), 2 << 20, smallest, held, activation)
    assert (
        "budget 2.00 MiB (2097152 bytes) of step peak = 1.00 MiB held and gradients + 50% of 2.00 MiB"
        in text
    )
    assert (
        f"smallest feasible is 2.24 MiB ({smallest} bytes) = 1.00 MiB held and gradients + 62%"
        in text
    )
    text = infeasible_message(Budget(bytes=1000), 1000, smallest, held, activation)
    assert "= less than the 1.00 MiB held before the step and its gradients is infeasible" in text
