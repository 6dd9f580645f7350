"""What the CLI can run: built-in models, Hugging Face architectures from configs, user files.

A target is ``gpt`` / ``mlp`` (built in), ``hf:<arch>`` (``hf:gpt2``, ``hf:llama``, ``hf:bert``, ...:
random weights from a small config, no downloads) or ``path/to/file.py:function`` (a function
returning ``(model, sample)``).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from memfit import models
from memfit.errors import MemfitError


class TargetCodeError(MemfitError):
    """The user's target file raised while memfit imported it or called its function."""


# Sizes of the hf: targets where the command line gives none. Parameter gradients, the head's
# logits and one block's backward working set set a floor under every plan's peak: at 2 layers
# of 2 x 32 tokens it is 74% of activation memory, above the README's `--budget 40%`; at 8
# layers of 2 x 128 tokens 21-47% by family, and a plan still takes seconds
# (benchmarks/results/design-figures.md, "Default sizes of hf: targets").
HF_SIZES: dict[str, int] = {"layers": 8, "seq": 128, "batch": 2}
# ViT ignores seq (65 tokens per 32x32 image): batch 8 brings its floor from 45% to 24%.
HF_ARCH_SIZES: dict[str, dict[str, int]] = {"vit": {"batch": 8}}


def load_target(
    target: str, size: Mapping[str, Any] | None = None, *, strict: bool = True
) -> tuple[nn.Module, Any]:
    """Build ``(model, sample)`` for a target string; ``size`` overrides sizes (layers, ...).

    With ``strict=False``, size options the target does not take are ignored (the demo applies
    one set of sizes to several models).

    Raises:
        ValueError: unknown target, naming the accepted forms.
        TargetCodeError: the user's target file raised (importing it or calling its function).
    """
    size = {key: value for key, value in (size or {}).items() if value is not None}
    if target.startswith("hf:"):
        from memfit.integrations.hf import build_hf

        arch = target[3:]
        sizes = {**HF_SIZES, **HF_ARCH_SIZES.get(arch, {}), **_hf_names(size)}
        return build_hf(arch, **_accepted(build_hf, sizes, strict))
    if ".py:" in target:
        path, _, function = target.rpartition(":")
        return _from_file(Path(path), function, size, strict)
    if target in models.BUILDERS:
        builder = models.BUILDERS[target]
        return builder(**_accepted(builder, size, strict))
    from memfit.integrations.hf import FAMILIES

    hf_names = ", ".join(f"hf:{arch}" for arch in sorted(FAMILIES))
    raise ValueError(
        f"unknown target {target!r}; use a built-in model ({', '.join(sorted(models.BUILDERS))}), "
        f"hf:<arch> ({hf_names}) or path/to/file.py:function"
    )


def _hf_names(size: Mapping[str, Any]) -> dict[str, Any]:
    renamed = {"width": "hidden"}
    return {renamed.get(key, key): value for key, value in size.items()}


def _accepted(function: Any, size: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    parameters = inspect.signature(function).parameters
    unknown = sorted(set(size) - set(parameters))
    if not strict:
        return {key: value for key, value in size.items() if key in parameters}
    if unknown:
        raise ValueError(
            f"size options {unknown} do not apply here; accepted: "
            f"{sorted(name for name in parameters if name != 'arch')}"
        )
    return dict(size)


@contextmanager
def _user_code(where: str) -> Iterator[None]:
    """Errors of the user's own code are theirs, not malformed arguments to memfit: whatever
    they raise (a ``ValueError`` too) comes out as :class:`TargetCodeError`."""
    try:
        yield
    except Exception as error:
        raise TargetCodeError(f"{where} raised {type(error).__name__}: {error}") from error


def _from_file(
    path: Path, function: str, size: Mapping[str, Any], strict: bool
) -> tuple[nn.Module, Any]:
    if not path.is_file():
        raise ValueError(f"target file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"memfit_target_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    with _user_code(f"importing {path}"):
        spec.loader.exec_module(module)
    builder = getattr(module, function, None)
    if not callable(builder):
        raise ValueError(f"{str(path)!r} has no function {function!r} returning (model, sample)")
    accepted = _accepted(builder, size, strict) if size else {}
    with _user_code(f"{path}:{function}()"):
        result = builder(**accepted)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        got = (
            f"a tuple of {len(result)} ({', '.join(type(item).__name__ for item in result)})"
            if isinstance(result, tuple)
            else f"a {type(result).__name__}"
        )
        raise ValueError(
            f"{path}:{function} must return (model, sample) with model an nn.Module; got {got}"
        )
    return result
