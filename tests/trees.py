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
