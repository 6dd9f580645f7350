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

__all__ = [
    "OptionKind",
    "applied_plan",
    "apply_plan",
    "option_kind",
    "register_before_apply",
    "register_option",
    "register_selective_policy",
    "remove_plan",
    "saved_ops",
    "stage_wrapper",
]
