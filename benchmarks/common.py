"""What every benchmark script shares: writing its results file."""

from __future__ import annotations

from pathlib import Path


def write_results(path: str | Path, lines: list[str]) -> str:
    """Join ``lines`` into the results text, write it to ``path`` (folders made), print it."""
    text = "\n".join(lines) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(text)
    return text
