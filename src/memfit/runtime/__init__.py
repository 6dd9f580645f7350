"""Executing plans on models: recompute segments (nested), stage options; apply/remove."""

from memfit.runtime.apply import applied_plan, apply_plan, register_before_apply, remove_plan
from memfit.runtime.options import (
    OptionKind,
    option_kind,
    register_option,
    register_selective_policy,
    saved_ops,
    stage_wrapper,
)
from memfit.runtime.rebuild import (
    REBUILD,
    REBUILD_LINEAR,
    REBUILD_OPS,
    pure_module,
    rebuilding,
    recording,
)

__all__ = [
    "REBUILD",
    "REBUILD_LINEAR",
    "REBUILD_OPS",
    "OptionKind",
    "applied_plan",
    "apply_plan",
    "option_kind",
    "pure_module",
    "rebuilding",
    "recording",
    "register_before_apply",
    "register_option",
    "register_selective_policy",
    "remove_plan",
    "saved_ops",
    "stage_wrapper",
]
