"""memfit: fit PyTorch training in less memory at the least cost in time.

>>> import memfit
>>> plan = memfit.auto(model, (tokens, targets), budget="40%")   # profile + plan + apply
>>> loss = model(tokens, targets); loss.backward()               # train as before
>>> memfit.verify(model, (tokens, targets)).gradients_equal
True
"""

import memfit.integrations  # noqa: F401  (registers HF's checkpointing switch with the runtime)
from memfit.errors import (
    AlreadyPlannedError,
    InfeasibleBudgetError,
    MemfitError,
    PlanFormatError,
    PlanMismatchError,
    RankMismatchError,
    UnsupportedModelError,
)
from memfit.measuring import Measurement, MemoryMeter, Profile, measure
from memfit.planning import ChainCosts, Plan
from memfit.planning.shape_fits import Shape
from memfit.units import Budget, format_bytes, parse_budget, parse_bytes
from memfit.verbs.api import Verification, apply, auto, plan, profile, remove, verify
from memfit.verbs.estimation import Estimate, ShapeProfile, estimate, profile_shapes

__version__ = "0.1.0"

__all__ = [
    "AlreadyPlannedError",
    "Budget",
    "ChainCosts",
    "Estimate",
    "InfeasibleBudgetError",
    "Measurement",
    "MemfitError",
    "MemoryMeter",
    "Plan",
    "PlanFormatError",
    "PlanMismatchError",
    "Profile",
    "RankMismatchError",
    "Shape",
    "ShapeProfile",
    "UnsupportedModelError",
    "Verification",
    "apply",
    "auto",
    "estimate",
    "format_bytes",
    "measure",
    "parse_budget",
    "parse_bytes",
    "plan",
    "profile",
    "profile_shapes",
    "remove",
    "verify",
]
