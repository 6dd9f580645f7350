"""Planning: costs in, plan out. Pure numbers: this package never imports torch."""

from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, Skip, StageCosts, uniform_chain
from memfit.planning.frontier import FrontierPoint, frontier
from memfit.planning.plan import Plan, Segment, Stage, keep_tree, recompute_one, validate_tree
from memfit.planning.simulate import Simulation, check_tree, simulate
from memfit.planning.solve import Strategy, min_peak_bytes, parse_strategy, solve

__all__ = [
    "KEEP",
    "ChainCosts",
    "FrontierPoint",
    "OptionCosts",
    "Plan",
    "Segment",
    "Simulation",
    "Skip",
    "Stage",
    "StageCosts",
    "Strategy",
    "check_tree",
    "frontier",
    "keep_tree",
    "min_peak_bytes",
    "parse_strategy",
    "recompute_one",
    "simulate",
    "solve",
    "uniform_chain",
    "validate_tree",
]
