"""Plans made by hand for the runtime tests (no profile, no solver)."""

from memfit.measuring.chain import Chain
from memfit.planning.plan import Item, Plan, Segment, Stage, recompute_one


def make_plan(chain: Chain, tree: tuple[Item, ...]) -> Plan:
    return Plan.from_tree(chain.stage_names, tree, "test")


def one_segment(chain: Chain) -> Plan:
    """All blocks in one recompute segment."""
    last = len(chain) - 1
    blocks = tuple(Stage(i) for i in range(1, last))
    return make_plan(chain, (Stage(0), Segment(1, last, blocks), Stage(last)))


def per_block(chain: Chain) -> Plan:
    """Every block recomputed on its own."""
    last = len(chain) - 1
    return make_plan(chain, (Stage(0), *map(recompute_one, range(1, last)), Stage(last)))


def head_plan(chain: Chain, option: str, recompute: bool = True) -> Plan:
    """Blocks recomputed one by one (or kept), the last stage run with ``option`` (a ``<post>``
    option, forced whether or not a solver would choose it)."""
    last = len(chain) - 1
    blocks = [recompute_one(i) if recompute else Stage(i) for i in range(1, last)]
    return make_plan(chain, (Stage(0), *blocks, Stage(last, option)))
