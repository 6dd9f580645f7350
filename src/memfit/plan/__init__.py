"""Planning: costs in, plan out. Pure numbers: this package never imports torch."""

from memfit.plan.costs import KEEP, ChainCosts, OptionCosts, StageCosts, uniform_chain
from memfit.plan.plan import Plan, Segment, Stage, keep_tree, recompute_one, validate_tree

__all__ = [
    "KEEP",
    "ChainCosts",
    "OptionCosts",
    "Plan",
    "Segment",
    "Stage",
    "StageCosts",
    "keep_tree",
    "recompute_one",
    "uniform_chain",
    "validate_tree",
]
