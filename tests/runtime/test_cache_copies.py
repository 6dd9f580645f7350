"""The structural copy of a cache (``caches.structural_copy``) makes each object as
``copy.copy`` would, taking a shorter path only where the result is the same: objects whose
class customises copying (``__copy__``, ``__reduce_ex__``, ``__setstate__``, ``__getstate__``,
``__getnewargs__``, slots) still go through ``copy.copy``."""

import copy
from typing import Any

import pytest
import torch

from memfit.runtime.caches import structural_copy


class Plain:
    def __init__(self) -> None:
        self.keys = torch.randn(2)
        self.layers = [Leaf(), Leaf()]


class Leaf:
    def __init__(self) -> None:
        self.values = torch.randn(2)
        self.count = 3


class CopiesItself(Plain):
    def __copy__(self) -> "CopiesItself":
        new = CopiesItself.__new__(CopiesItself)
        new.__dict__.update(self.__dict__)
        new.copied = True
        return new


class Reduces(Plain):
    def __reduce_ex__(self, protocol: Any) -> Any:
        return (Reduces, (), {**self.__dict__, "reduced": True})


class SetsState(Plain):
    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, restored=True)


class GetsState(Plain):
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "got": True}


class NewArgs(Plain):
    def __new__(cls, tag: str = "default") -> "NewArgs":
        new = super().__new__(cls)
        new.tag = tag
        return new

    def __init__(self, tag: str = "default") -> None:
        super().__init__()

    def __getnewargs__(self) -> tuple[str]:
        return ("from getnewargs",)


class Slotted:
    __slots__ = ("__dict__", "keys")

    def __init__(self) -> None:
        self.keys = torch.randn(2)
        self.other = 1


@pytest.mark.parametrize(
    "kind", [Plain, CopiesItself, Reduces, SetsState, GetsState, NewArgs, Slotted]
)
def test_a_structural_copy_copies_as_copy_does(kind: type) -> None:
    original = kind()
    made, expected = structural_copy(original), copy.copy(original)
    assert type(made) is kind and made is not original
    assert vars(made).keys() == vars(expected).keys()
    for name, value in vars(expected).items():
        if isinstance(value, torch.Tensor | int | str | bool):
            assert vars(made)[name] is value  # tensors and plain values shared
    if isinstance(original, Slotted):
        assert made.keys is original.keys
    layers = getattr(original, "layers", None)
    if layers is not None:  # the containers and objects inside are new, their tensors shared
        assert made.layers is not layers
        assert all(new is not old for new, old in zip(made.layers, layers, strict=True))
        assert all(new.values is old.values for new, old in zip(made.layers, layers, strict=True))
