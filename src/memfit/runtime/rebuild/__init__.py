"""The ``rebuild`` options: selective recompute at unpack time, without a checkpoint.

A block runs as it is under ``saved_tensors_hooks`` that hold every saved tensor in a handle;
when its forward ends, each saved storage that can be rebuilt from what stays saved is dropped,
and backward rebuilds it, bit for bit, when it first unpacks it. What can be rebuilt, when a
storage is dropped and what it costs: ``docs/runtime-options.md``, section "Rebuild".

One job per module:

* :mod:`.handles`: the handles autograd keeps, the sources that rebuild dropped storages, and
  the per-storage recipe;
* :mod:`.modules`: recipes that rerun an autograd node's op or a pure (or linear) module;
* :mod:`.ops`: op chains (``rebuild+ops``): the recorded aten calls and the recipe that reruns
  a chain of cheap ops;
* :mod:`.op_recorder`: the dispatch mode that records which op made each storage, and the
  search for the chain that rebuilds one;
* :mod:`.masks`: tensors of zeros and one value (dropout masks) kept as bool masks;
* :mod:`.block`: one block's forward under the hooks, deciding what to drop when it ends;
* :mod:`.stage`: the options' stage wrapper, registered with the option registry.
"""

from memfit.runtime.rebuild.block import rebuilding, recording
from memfit.runtime.rebuild.masks import TWO_VALUED_LABEL, TWO_VALUED_MIN_NUMEL, two_valued
from memfit.runtime.rebuild.modules import NODE_RECIPES, PURE_MODULES, linear_module, pure_module
from memfit.runtime.rebuild.op_recorder import MAX_CHAIN
from memfit.runtime.rebuild.ops import CHEAP_OPS, cheap_op
from memfit.runtime.rebuild.stage import REBUILD, REBUILD_LINEAR, REBUILD_OPS, Rebuilt

__all__ = [
    "CHEAP_OPS",
    "MAX_CHAIN",
    "NODE_RECIPES",
    "PURE_MODULES",
    "REBUILD",
    "REBUILD_LINEAR",
    "REBUILD_OPS",
    "TWO_VALUED_LABEL",
    "TWO_VALUED_MIN_NUMEL",
    "Rebuilt",
    "cheap_op",
    "linear_module",
    "pure_module",
    "rebuilding",
    "recording",
    "two_valued",
]
