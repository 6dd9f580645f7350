"""How long the test suite takes: wall seconds and CPU seconds (user + sys, every process the
command starts: pytest-xdist's workers and the distributed tests' ranks included).

On a shared machine wall time measures the other work as much as the suite; CPU time much less
so, hence both, with the load average before and after each command.

    .venv/bin/python benchmarks/bench_suite.py                   # make quick, then make unit
    .venv/bin/python benchmarks/bench_suite.py --commands "make quick"
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import time
from datetime import date
from pathlib import Path

from common import header, write_results

ROOT = Path(__file__).resolve().parents[1]


def timed(command: str) -> dict[str, object]:
    """Run ``command`` in the repository root; its wall and CPU seconds, exit code and load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {
        "command": command,
        "wall_s": wall_s,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "code": done.returncode,
        "load": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
        "summary": lines[-1] if lines else done.stderr.strip()[-200:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", default="make quick;make unit", help="';'-separated")
    parser.add_argument(
        "--out", default=str(ROOT / f"benchmarks/results/suite-time-{date.today()}.md")
    )
    options = parser.parse_args()
    lines = [f"# Test suite time ({date.today()})", "", *header(libraries=("torch",)), ""]
    lines += ["| command | wall s | user + sys s | load before / after | exit | last line |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for command in options.commands.split(";"):
        row = timed(command.strip())
        cpu_s = float(row["user_s"]) + float(row["sys_s"])  # type: ignore[arg-type]
        lines.append(
            f"| `{row['command']}` | {row['wall_s']:.0f} | {cpu_s:.0f} | {row['load']} | "
            f"{row['code']} | {row['summary']} |"
        )
    write_results(options.out, lines)


if __name__ == "__main__":
    main()
