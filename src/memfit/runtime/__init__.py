"""Executing plans on models: recompute segments (nested), selective policies; apply/remove."""

from memfit.runtime.apply import applied_plan, apply_plan, remove_plan
from memfit.runtime.options import run_with_option, saved_ops

__all__ = ["applied_plan", "apply_plan", "remove_plan", "run_with_option", "saved_ops"]
