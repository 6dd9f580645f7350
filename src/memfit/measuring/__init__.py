"""Measuring: the memory meter, training steps, chain discovery and per-stage profiles."""

from memfit.measuring.chain import POST, PRE, Chain, find_chain
from memfit.measuring.meter import MemoryMeter, MemoryReading, Span
from memfit.measuring.profile import Profile, build_profile, fingerprint
from memfit.measuring.readings import Measurement, StageReading
from memfit.measuring.run import measure, measure_stages, time_step

__all__ = [
    "POST",
    "PRE",
    "Chain",
    "Measurement",
    "MemoryMeter",
    "MemoryReading",
    "Profile",
    "Span",
    "StageReading",
    "build_profile",
    "find_chain",
    "fingerprint",
    "measure",
    "measure_stages",
    "time_step",
]
