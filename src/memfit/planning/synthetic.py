"""Synthetic heterogeneous chains for benchmarks and tests (no torch, no measuring).

A chain looks like a transformer at block granularity: an embedding, ``n - 2`` blocks of varying
widths and a head; each block has ``keep`` plus ``selective:*`` options that save less and spend
more time in backward. Byte figures are odd on purpose (no common unit), so the solver works on a
rounded grid as it does on measured profiles. Costs are consistent like measured ones: a stage's
input is the previous output and every option frees in backward what it saved.
"""

from __future__ import annotations

import numpy as np

from memfit.planning.costs import KEEP, ChainCosts, OptionCosts, StageCosts

MIB = 1 << 20


def heterogeneous_chain(n: int, *, options: int = 3, seed: int = 0) -> ChainCosts:
    """A synthetic chain of ``n`` stages, each with up to ``options`` options.

    Args:
        n: number of stages (at least 1).
        options: options per checkpointable stage: ``keep`` plus ``options - 1`` selective ones.
        seed: seed of the random sizes and times.

    Returns:
        The chain.

    Example:
        >>> chain = heterogeneous_chain(10)
        >>> len(chain), sorted(chain.stages[1].options)
        (10, ['keep', 'selective:0', 'selective:1'])
    """
    if n < 1 or options < 1:
        raise ValueError(f"need n >= 1 and options >= 1; got n={n}, options={options}")
    rng = np.random.default_rng(seed)
    outputs = (rng.uniform(8, 32, n) * MIB).astype(np.int64) + rng.integers(1, 4096, n)
    outputs[-1] = 4  # the loss
    stages = []
    for i in range(n):
        output = int(outputs[i])
        given = int(outputs[i - 1]) if i else int(2 * MIB)
        saved = int(given * rng.uniform(2, 8)) + int(rng.integers(1, 4096))
        grads = int(rng.uniform(0, 4) * MIB) if 0 < i < n - 1 else 0
        forward_s = float(rng.uniform(1e-3, 4e-3))
        menu: dict[str, OptionCosts] = {}
        for number in range(options if 0 < i < n - 1 else 1):
            keep_fraction = 1.0 - 0.35 * number
            kept = int(saved * keep_fraction)
            backward_s = forward_s * (2.0 + 0.45 * number)
            menu[KEEP if number == 0 else f"selective:{number - 1}"] = OptionCosts(
                forward_s=forward_s,
                backward_s=backward_s,
                saved_bytes=kept,
                forward_peak_bytes=kept + output + int(given * 0.5),
                backward_peak_bytes=int(given * (1.5 + number * 0.3)) + grads,
                backward_delta_bytes=grads - kept - output,
            )
        stages.append(
            StageCosts(
                name="embed" if i == 0 else "head" if i == n - 1 else f"blocks.{i - 1}",
                input_bytes=given,
                output_bytes=output,
                options=menu,
                nosave_forward_s=forward_s * 0.95,
                nosave_forward_peak_bytes=output + int(given * 0.5),
                checkpointable=0 < i < n - 1,
            )
        )
    held = int(rng.uniform(100, 200) * MIB) * n
    return ChainCosts(stages=stages, held_bytes=held, fingerprint=f"synthetic-{n}-{seed}")
