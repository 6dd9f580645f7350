"""Executing plans on models: recompute segments (nested), stage options; apply/remove."""

from memfit.runtime.apply import applied_plan, apply_plan, register_before_apply, remove_plan
from memfit.runtime.compress import BF16, COMPRESS, FP8, compress_log, is_compress
from memfit.runtime.options import (
    OptionKind,
    is_exact,
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
    "BF16",
    "COMPRESS",
    "FP8",
    "REBUILD",
    "REBUILD_LINEAR",
    "REBUILD_OPS",
    "OptionKind",
    "applied_plan",
    "apply_plan",
    "compress_log",
    "is_compress",
    "is_exact",
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
