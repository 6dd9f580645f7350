"""Switches of a Hugging Face model that a plan must see: the library's own gradient checkpointing
(off while a plan is on, back on with ``memfit.remove``) and LayerDrop (random layer skipping,
refused). These are facts about running the model, so they live in the runtime; the builders and
the Trainer callback stay in :mod:`memfit.integrations`.

transformers is never imported here: HF models are recognised by their attributes
(``gradient_checkpointing``, ``*layerdrop`` fields).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from memfit.errors import UnsupportedModelError

__all__ = [
    "HFCheckpointing",
    "disable_hf_checkpointing",
    "hf_checkpointing_off",
    "layerdrop_fields",
    "off_for_the_plan",
    "refuse_layerdrop",
]


def _checkpointing_on(module: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())


# what HF's checkpointing switch sets on modules
_SWITCHES = ("gradient_checkpointing", "_gradient_checkpointing_func")
_MISSING = object()


def _live(handle: Any) -> bool:
    """Whether a hook's ``RemovableHandle`` still names a registered hook."""
    ref = getattr(handle, "hooks_dict_ref", None)
    hooks = ref() if callable(ref) else None
    return hooks is not None and getattr(handle, "id", None) in hooks


def _input_grads_hooked(module: nn.Module) -> bool:
    """Whether ``enable_input_require_grads`` hooks are on the module (transformers 5 keeps a
    list, 4 one handle, which its disable removes but leaves in place: hence the check that
    the hook is still registered)."""
    hooks = module.__dict__.get("_require_grads_hooks") or ()
    handle = module.__dict__.get("_require_grads_hook")
    return any(_live(hook) for hook in (*hooks, handle) if hook is not None)


class HFCheckpointing:
    """Hugging Face's checkpointing as the user had set it, to put back: each module's
    switches (``gradient_checkpointing``, its checkpoint function with the user's arguments)
    and the input-require-grads hooks (PEFT's, or ``enable_input_require_grads``) that HF's
    disable removes from models with an adapter loaded."""

    def __init__(self, model: nn.Module) -> None:
        self.switches = [
            (module, name, module.__dict__.get(name, _MISSING))
            for module in model.modules()
            for name in _SWITCHES
        ]
        self.hooked = [module for module in model.modules() if _input_grads_hooked(module)]

    def restore(self) -> None:
        """Switches as they were; input-require-grads hooks registered again where removed."""
        for module, name, value in self.switches:
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value
        for module in self.hooked:
            enable = getattr(module, "enable_input_require_grads", None)
            if not _input_grads_hooked(module) and callable(enable):
                enable()


def hf_checkpointing_off(model: nn.Module, *, warn: bool = True) -> HFCheckpointing | None:
    """Turn off Hugging Face's own gradient checkpointing if the user enabled it, and return
    what to restore (``None`` when it was off: nothing changed).

    A memfit plan replaces it; both at once would checkpoint inside checkpoints. Looks inside
    wrappers too (an HF model held by a plain ``nn.Module``). Warns when it acts and ``warn``.
    :func:`memfit.apply` turns it off (``memfit.remove`` turns it back on), profiling for its
    duration.
    """
    if not _checkpointing_on(model):
        return None
    before = HFCheckpointing(model)
    if warn:
        warnings.warn(
            "Hugging Face gradient checkpointing was enabled on this model; memfit turned it "
            "off because memfit's plan replaces it (both at once would recompute twice); "
            "memfit.remove(model) turns it back on",
            UserWarning,
            stacklevel=4,
        )
    for module in model.modules():
        # transformers 5 renamed it "activation checkpointing" and warns on the old names
        names = ("activation_checkpointing_disable", "gradient_checkpointing_disable")
        disable = next((getattr(module, n) for n in names if hasattr(module, n)), None)
        if disable is not None and _checkpointing_on(module):
            disable()
    for module in model.modules():  # layers of custom code that HF's switch does not reach
        if getattr(module, "gradient_checkpointing", False) is True:
            module.gradient_checkpointing = False  # type: ignore[assignment]
    return before


def disable_hf_checkpointing(model: nn.Module) -> bool:
    """Turn off Hugging Face's own gradient checkpointing if the user enabled it (with a
    warning; see :func:`hf_checkpointing_off`).

    Args:
        model: any model; HF models are recognised by their ``gradient_checkpointing`` flags.

    Returns:
        Whether HF checkpointing was on (and is now off).
    """
    return hf_checkpointing_off(model) is not None


def off_for_the_plan(model: nn.Module) -> Callable[[], None] | None:
    """apply's hook: off while the plan is on; ``memfit.remove`` calls what this returns."""
    before = hf_checkpointing_off(model)
    return None if before is None else before.restore


def layerdrop_fields(model: nn.Module) -> dict[str, float]:
    """Where ``model`` turns on LayerDrop (random layer skipping): every config field and
    module attribute whose name ends in ``layerdrop`` with a value above 0, by its path
    (``config.layerdrop``, ``speecht5.encoder.wrapped_encoder.layerdrop``).

    wav2vec2, HuBERT, WavLM, UniSpeech, SpeechT5, SeamlessM4T and Autoformer default to 0.1;
    their layers read the config's field (``config.layerdrop``) or a copy made when the model
    was built (``self.layerdrop = config.encoder_layerdrop``).
    """
    found: dict[str, float] = {}
    configs: set[int] = set()
    for fqn, module in model.named_modules():
        prefix = f"{fqn}." if fqn else ""
        owners: list[tuple[str, Any]] = [(prefix, vars(module))]
        config = getattr(module, "config", None)
        if config is not None and id(config) not in configs and hasattr(config, "to_dict"):
            configs.add(id(config))
            owners.append((f"{prefix}config.", vars(config)))
        for path, fields in owners:
            for name, value in fields.items():
                if (
                    name.endswith("layerdrop")
                    and isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and value > 0
                ):
                    found[f"{path}{name}"] = float(value)
    return found


def refuse_layerdrop(model: nn.Module) -> None:
    """Refuse a model that skips layers at random (LayerDrop), naming the fields to set.

    A plan fixes which blocks run, which are recomputed and which segments they form, and its
    budget comes from a step in which every block ran; a block skipped in one step and run in
    the next would leave a segment open or run a step the plan never measured. memfit refuses
    rather than guess. :func:`memfit.profile` calls it before anything is measured, and
    :func:`memfit.apply` before the model changes.

    Raises:
        UnsupportedModelError: LayerDrop is on somewhere in ``model``.
    """
    found = layerdrop_fields(model)
    if not found:
        return
    fields = ", ".join(f"{path}={value:g}" for path, value in found.items())
    names = sorted({path.rpartition(".")[2] for path in found})
    build = ", ".join(f"{name}=0.0" for name in names)
    raise UnsupportedModelError(
        f"{type(model).__name__} skips layers at random in training (LayerDrop: {fields}); "
        f"memfit plans a fixed chain of blocks and cannot plan a step whose blocks come and go. "
        f"Turn LayerDrop off: build the model with {build} (from_pretrained(name, {build}) or "
        f"its config), or set each field named here to 0.0 on the built model"
    )
