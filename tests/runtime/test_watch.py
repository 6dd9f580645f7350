"""The write watch (``guards.Watch``) on its own: every change a recomputed block's first run can
make to its modules is caught, by identity and version comparisons of flat lists (the fast path,
``Watch._unchanged``), and then named by the attribute-by-attribute pass (``Watch._written``).
The fast path may only say "unchanged" where the full pass would find nothing."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from memfit.errors import UnsupportedModelError
from memfit.runtime.guards import Watch


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("seen", torch.zeros(()))
        self.scale = torch.ones(3)  # a plain tensor attribute
        self.label = "inner"
        self.kept = object()


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Inner()
        self.b = Inner()
        self.norm = nn.BatchNorm1d(3)
        self.calls = 0


def _move_kept(block: Block) -> None:
    """One attribute object leaves one submodule for another: every dict keeps its size in
    sum, so only per-dict sizes and keys tell."""
    kept = block.a.kept
    del block.a.kept
    del block.b.kept
    block.b.kept = kept


def _readd_same(block: Block) -> None:
    kept = block.a.kept
    del block.a.kept
    block.a.kept = kept  # the same object, last in the dict now


def _replace_parameter(block: Block) -> None:
    block.a.linear.weight = nn.Parameter(block.a.linear.weight.detach().clone())


def _write_parameter(block: Block) -> None:
    with torch.no_grad():
        block.b.linear.bias.mul_(1.0)


# mutation -> (names refused, names replayed); both empty: nothing to report
CHANGES: dict[str, tuple[Callable[[Block], object], list[str], list[str]]] = {
    "nothing": (lambda block: None, [], []),
    "tensor attribute in place": (lambda block: block.a.scale.add_(1), ["a.scale"], []),
    "buffer in place": (lambda block: block.b.seen.add_(1), ["b.seen"], []),
    "parameter in place": (_write_parameter, ["b.linear.bias"], []),
    "parameter replaced": (_replace_parameter, ["a.linear.weight"], []),
    "attribute of another type rebound": (
        lambda block: setattr(block.a, "kept", object()),
        ["a.kept"],
        [],
    ),
    "counter": (lambda block: setattr(block, "calls", block.calls + 1), [], ["calls"]),
    "equal string, another object": (
        lambda block: setattr(block.b, "label", "".join(["in", "ner"])),
        [],
        ["b.label"],
    ),
    "tensor attribute rebound": (
        lambda block: setattr(block.b, "scale", block.b.scale * 2),
        [],
        ["b.scale"],
    ),
    "buffer rebound": (
        lambda block: setattr(block.a, "seen", block.a.seen + 1),
        [],
        ["a.seen"],
    ),
    "attribute added": (lambda block: setattr(block.a, "extra", 1.5), [], ["a.extra"]),
    "attribute deleted": (lambda block: delattr(block.b, "label"), [], ["b.label"]),
    "attribute moved between modules": (_move_kept, ["a.kept", "b.kept"], []),
    # the same object back under the same name: nothing a rerun could read differently
    "attribute deleted and set again": (_readd_same, [], []),
    # restored after every rerun (memfit.runtime.replay), so no write
    "norm statistics": (lambda block: block.norm(torch.randn(4, 3)), [], []),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_the_watch_sees_every_change(change: str) -> None:
    mutate, refused, replayed = CHANGES[change]
    block = Block().train()
    watch = Watch("blocks.0", list(block.named_modules()), torch.randn(2, 3), (), {})
    mutate(block)
    rebound, written = watch._written()
    assert written == refused
    assert sorted(write.name for write in rebound) == replayed
    # the fast path never hides a write or a rebinding; it may send "nothing" to the full pass
    if refused or replayed:
        assert not watch._unchanged()
    if refused:
        with pytest.raises(UnsupportedModelError, match="writes to its modules' state"):
            watch.check()
    else:
        assert sorted(write.name for write in watch.check()) == replayed


def test_an_argument_changed_in_place_is_refused() -> None:
    block, mask = Block(), torch.zeros(3)
    watch = Watch("blocks.0", list(block.named_modules()), torch.randn(2, 3), ((mask,),), {})
    mask.sub_(1.0)
    with pytest.raises(UnsupportedModelError, match="changes its positional argument 1 in place"):
        watch.check()


def test_an_unchanged_block_takes_the_fast_path() -> None:
    block = Block()
    watch = Watch("blocks.0", list(block.named_modules()), torch.randn(2, 3), (), {})
    assert watch._unchanged()
    assert watch.check() == []
