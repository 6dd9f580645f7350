"""Hugging Face transformers: the layer stack, small models from configs (built in
:mod:`memfit.integrations.hf_models`) and the Trainer callback, with the model switches a plan
must see (HF's own gradient checkpointing, LayerDrop: :mod:`memfit.runtime.hf_switches`)
re-exported here.

transformers is optional: it is imported only inside the functions that need it. memfit finds
the layer stack of HF encoders/decoders with its generic chain search (each layer is called once,
in order, on the previous layer's hidden states); :func:`hf_block_names` names it from the
model's own metadata where that search cannot run (LayerDrop skipping layers, say).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from torch import nn

from memfit.integrations.hf_models import FAMILIES, build_hf
from memfit.runtime.hf_switches import (
    HFCheckpointing,
    disable_hf_checkpointing,
    hf_checkpointing_off,
    layerdrop_fields,
    refuse_layerdrop,
)

if TYPE_CHECKING:
    from memfit.integrations.hf_trainer import MemfitCallback

__all__ = [
    "FAMILIES",
    "HFCheckpointing",
    "MemfitCallback",
    "build_hf",
    "disable_hf_checkpointing",
    "hf_block_names",
    "hf_checkpointing_off",
    "layerdrop_fields",
    "refuse_layerdrop",
]


def hf_block_names(model: nn.Module) -> tuple[str, ...] | None:
    """The fqns of a Hugging Face model's layer stack, from its own metadata, or ``None``.

    The layers are the modules whose class HF lists in ``_no_split_modules`` or that subclass
    ``GradientCheckpointingLayer``; when they sit in several containers (an encoder's and a
    decoder's), every container with as many layers as the largest is a group of the chain,
    as :func:`~memfit.measuring.chain.find_chain` finds them. Pass the result as ``blocks=``.

    Returns:
        The fqns in module order, or ``None`` when the model names no layers (not an HF model).
    """
    layer_class: tuple[type, ...] = ()
    # an HF model means transformers is imported already; never pay its import for other models
    layers_module = sys.modules.get("transformers.modeling_layers")
    if layers_module is not None and hasattr(layers_module, "GradientCheckpointingLayer"):
        layer_class = (layers_module.GradientCheckpointingLayer,)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name and (type(module).__name__ in no_split or isinstance(module, layer_class)):
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    stacks: list[list[str]] = [names for names in groups.values() if len(names) >= 2]
    if not stacks:
        return None
    most = max(len(names) for names in stacks)
    # stacks nested in another stack's layers are that layer's business
    outer = [
        names
        for names in stacks
        if len(names) == most
        and not any(names[0].startswith(layer + ".") for other in stacks for layer in other)
    ]
    return tuple(name for names in outer for name in names)


def __getattr__(name: str) -> Any:
    # MemfitCallback subclasses transformers' TrainerCallback: import transformers only when
    # the callback is asked for, never with memfit
    if name == "MemfitCallback":
        from memfit.integrations.hf_trainer import MemfitCallback

        return MemfitCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
