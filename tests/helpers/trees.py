"""Schedule trees over a 4-block chain (stage 0 ``<pre>``, 1..4 the blocks, 5 ``<post>``) that the
runtime tests of the built-in and the Hugging Face models share."""

from memfit.planning.plan import Segment, Stage, recompute_one

TREES: dict[str, tuple] = {
    "all keep": tuple(Stage(i) for i in range(6)),
    "every block recomputed": (Stage(0), *[recompute_one(i) for i in range(1, 5)], Stage(5)),
    "one segment": (Stage(0), Segment(1, 5, tuple(Stage(i) for i in range(1, 5))), Stage(5)),
    "selective matmul": (Stage(0), *[Stage(i, "selective:matmul") for i in range(1, 5)], Stage(5)),
    "rebuild": (Stage(0), *[Stage(i, "rebuild") for i in range(1, 5)], Stage(5)),
    "rebuild+linear": (Stage(0), *[Stage(i, "rebuild+linear") for i in range(1, 5)], Stage(5)),
    # every kind of top-level item side by side
    "rebuild mixed": (
        Stage(0),
        Stage(1, "rebuild"),
        Segment(2, 4, (recompute_one(2), Stage(3))),
        Stage(4, "rebuild+linear"),
        Stage(5),
    ),
}


# stages: 0 <pre>, 1..4 the blocks, 5 <post>; the runtime tests add nested trees
RUNTIME_TREES: dict[str, tuple] = {
    **TREES,
    # outer segment over 3 blocks; inside it, block 1 recomputed again, blocks 2, 3 kept;
    # block 4 under a selective policy at the top level
    "nested": (
        Stage(0),
        Segment(1, 4, (recompute_one(1), Stage(2), Stage(3))),
        Stage(4, "selective:matmul"),
        Stage(5),
    ),
    "three levels": (
        Stage(0),
        Segment(
            1,
            5,
            (
                Segment(1, 3, (recompute_one(1), Stage(2))),
                Stage(3),
                recompute_one(4),
            ),
        ),
        Stage(5),
    ),
    "selective by op": (
        Stage(0),
        *[Stage(i, "selective:save=addmm+gelu") for i in range(1, 5)],
        Stage(5),
    ),
}
