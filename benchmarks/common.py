"""What every benchmark script shares: writing its results file."""

from __future__ import annotations

import argparse
from pathlib import Path


def write_results(path: str | Path, lines: list[str]) -> str:
    """Join ``lines`` into the results text, write it to ``path`` (folders made), print it."""
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
    return text


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (default 1): on a shared 2-core machine two intra-op threads wait on each
    other behind other processes (measured: steps 2-15x slower, medians unstable)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads; 1 by default: on a shared 2-core machine two threads wait on "
        "each other behind other processes (measured: steps 2-15x slower, medians unstable)",
    )
