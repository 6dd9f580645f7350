"""What every benchmark script shares: the results file's header lines, and writing the file."""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import platform
import sys
from collections.abc import Sequence
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(
    device: str = "", libraries: Sequence[str] = ("torch", "transformers"), note: str = ""
) -> list[str]:
    """The lines every results file starts with: the machine and its load at the start, the
    versions of python and ``libraries`` (those installed), torch's intra-op threads when torch
    is loaded, and ``device`` (default: the CUDA device's name, else CPU) with ``note``."""
    versions = [f"python {platform.python_version()}"]
    for name in libraries:
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None:
        versions.append(f"{torch.get_num_threads()} intra-op thread(s)")
        if not device:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"- machine: {platform.system()} {platform.release()} {platform.machine()}, {cpu_name()}, "
        f"{os.cpu_count()} logical CPUs, load average {load} at the start (shared with other work)",
        f"- {', '.join(versions)}",
        f"- device: {device or 'CPU'}{f' {note}' if note else ''}",
    ]


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
