"""The ``memfit`` command: demo, profile, plan, estimate, bench. Each subcommand is a thin layer over the
public API.

Exit codes: 0 ok; 1 infeasible budget, failed check, or an error raised while running (by the
user's model file, its forward, or memfit); 2 usage error (bad flags, sizes, budget, strategy
or target; an output file in a missing folder, an --out folder that is a file; a model with
nothing to train or already compiled), checked before anything is measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

from memfit.errors import InfeasibleBudgetError, MemfitError
from memfit.integrations.hf_models import FAMILIES

DEFAULT_BUDGETS = "30%,50%,70%"
DEMO_MODELS = ("gpt", "mlp")


class UsageError(Exception):
    """The command line asked for something malformed (exit code 2); ``__cause__`` says what."""


def _usage(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``function``, reading its malformed-argument errors as usage errors."""
    try:
        return function(*args, **kwargs)
    except (ValueError, TypeError, ImportError) as error:
        raise UsageError(str(error)) from error


def _load(target: str, args: argparse.Namespace, strict: bool = True) -> tuple[Any, Any]:
    """The target's (model, sample). An unknown target or size is a usage error; an error the
    user's own file raises comes out as a ``MemfitError`` (see :mod:`memfit.targets`)."""
    from memfit.measuring.step import check_step_arguments
    from memfit.runtime.compiled import refuse_compiled_model
    from memfit.targets import load_target

    model, sample = _usage(load_target, target, _size_options(args), strict=strict)
    # what memfit would refuse before measuring (a compiled wrapper, nothing to train): usage
    _usage(refuse_compiled_model, model, "profile")
    _usage(check_step_arguments, model, sample)
    return model, sample


def _output_file(path: str | None, flag: str) -> None:
    """Refuse, before any work, a file the command could not write at the end."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path!r} is a folder; give a file name such as plan.json")
    if not target.parent.is_dir():
        raise UsageError(
            f"{flag} {path!r}: the folder {str(target.parent)!r} does not exist; create it "
            f"first or write elsewhere"
        )


def _output_folder(path: str | None, flag: str) -> None:
    """Refuse, before any work, a folder the command could not create or write into."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise UsageError(
            f"{flag} {path!r} is a file; {flag} names a folder for the plots and JSON (it is "
            f"created when missing)"
        )
    parent = next((p for p in [target, *target.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{flag} {path!r}: {str(parent)!r} is a file, not a folder")


def _budgets(text: str) -> list[str]:
    from memfit.units import parse_budget

    budgets = [item.strip() for item in text.split(",") if item.strip()]
    for budget in budgets:
        _usage(parse_budget, budget)
    return budgets


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


class _Output:
    """Where results go: rich on a terminal, plain text otherwise; JSON on request."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        try:
            from rich.console import Console

            self.console: Any = Console(stderr=as_json)
            if not self.console.is_terminal:  # files and pipes get whole tables, not 80 columns
                self.console = Console(stderr=as_json, width=200)
            self.error_console: Any = Console(stderr=True)
        except ImportError:
            self.console = self.error_console = None

    def show(self, renderable: Any) -> None:
        if self.console is not None:
            self.console.print(renderable)
        else:
            print(renderable, file=sys.stderr if self.as_json else sys.stdout)

    def say(self, message: str) -> None:
        self.show(message)

    def json(self, data: Any) -> None:
        print(json.dumps(data, indent=1, default=str))

    @contextmanager
    def progress(self, message: str) -> Iterator[Callable[[str], None]]:
        """A spinner with a changing message on a terminal; silent elsewhere."""
        if self.error_console is None or not self.error_console.is_terminal:
            yield lambda _message: None
            return
        with self.error_console.status(message) as status:
            yield lambda text: status.update(f"{message}: {text}")


def _size_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: getattr(args, key)
        for key in ("layers", "width", "seq", "batch", "heads")
        if getattr(args, key, None) is not None
    }


def _keep(args: argparse.Namespace) -> bool:
    """Whether the measured loop keeps the model's output alive through backward."""
    return not getattr(args, "drop_output", False)


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU x{os.cpu_count()}, torch {torch.__version__}, {date.today()}"


def _cmd_profile(args: argparse.Namespace, out: _Output) -> int:
    import memfit
    from memfit.report.tables import ops_table, profile_table

    _output_file(args.output, "-o/--output")
    model, sample = _load(args.target, args)
    with out.progress(f"profiling {args.target}"):
        prof = memfit.profile(
            model,
            sample,
            repeats=args.repeats,
            thorough=args.thorough,
            keep_output=_keep(args),
            exact=not args.inexact,
        )
    if args.output:
        Path(args.output).write_text(prof.to_json())
    if out.as_json:
        out.json(prof.to_dict())
        return 0
    out.show(profile_table(prof))
    ops = ops_table(prof)
    if ops is not None:
        out.show(ops)
    return 0


def _cmd_plan(args: argparse.Namespace, out: _Output) -> int:
    import memfit
    from memfit.planning.lossy import check_max_error
    from memfit.planning.solve import Strategy, parse_strategy
    from memfit.report.tables import plan_table
    from memfit.units import parse_budget, parse_bytes

    _usage(parse_budget, args.budget)
    _usage(parse_strategy, args.strategy)
    if args.host_budget is not None:
        _usage(parse_bytes, args.host_budget)
    if args.max_error is not None:
        if not args.inexact:
            raise UsageError("--max-error bounds lossy options, which only --inexact offers")
        _usage(check_max_error, args.max_error)
    if args.candidates > 1 and parse_strategy(args.strategy)[0] is not Strategy.OPTIMAL:
        raise UsageError(
            f"--candidates times optimal plans; --strategy is {args.strategy!r}: use --strategy "
            f"optimal or drop --candidates"
        )
    _output_file(args.output, "-o/--output")
    model, sample = _load(args.target, args)
    timing = f", timing up to {args.candidates} plans" if args.candidates > 1 else ""
    with out.progress(f"profiling {args.target}{timing}"):
        plan = memfit.plan(
            model,
            sample,
            budget=args.budget,
            strategy=args.strategy,
            host_budget=args.host_budget,
            candidates=args.candidates,
            repeats=args.repeats,
            thorough=args.thorough,
            keep_output=_keep(args),
            exact=not args.inexact,
            max_error=args.max_error,
        )
    if args.output:
        Path(args.output).write_text(plan.to_json())
    if out.as_json:
        out.json(plan.to_dict())
    else:
        out.show(plan_table(plan))
        if args.output:
            out.say(f"plan written to {args.output}")
    return 0


def _sizes_list(text: str) -> list[int]:
    sizes = [int(item) for item in text.split(",") if item.strip()]
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"expected sizes >= 1 such as 512,1024; got {text!r}")
    return sizes


def _cmd_estimate(args: argparse.Namespace, out: _Output) -> int:
    import memfit
    from memfit.measuring.sample_shapes import resize_sample, sample_layout
    from memfit.report.tables import estimate_table
    from memfit.targets import load_target
    from memfit.units import format_bytes, parse_budget

    if args.budget is not None:
        _usage(parse_budget, args.budget)
    model, sample = _load(args.target, args)
    layout = sample_layout(sample)
    longest = max(args.shape_seq or [0])
    if ".py:" not in args.target and layout.has_seq and longest > layout.shape.seq:
        # built-in and hf:* targets size their position table by their sample's seq: built for
        # the longest seq asked (as a model trained there is), so that the profile's longer
        # seqs can run; the sample keeps the target's own size
        model, big = _usage(load_target, args.target, {**_size_options(args), "seq": longest})
        sample = resize_sample(big, layout.shape)
    shapes: dict[str, list[int]] = {}
    if args.shape_seq:
        shapes["seq"] = args.shape_seq
    if args.shape_batch:
        shapes["batch"] = args.shape_batch
    with out.progress(f"profiling {args.target} at a few shapes"):
        result = _usage(
            memfit.estimate,
            model,
            sample,
            shapes=shapes,
            budget=args.budget,
            strategy=args.strategy,
            largest=args.largest,
            repeats=args.repeats,
            keep_output=_keep(args),
        )
    if out.as_json:
        out.json(result.to_dict())
        return 0
    out.show(estimate_table(result, f"{args.target} on {_machine()}"))
    if args.largest:
        first = result.rows[0].shape
        if result.largest is None:
            out.say(f"no {args.largest} fits {args.budget}, even at 1")
        else:
            at = f"batch {first.batch}" if args.largest == "seq" else f"seq {first.seq}"
            found = result.largest.seq if args.largest == "seq" else result.largest.batch
            budget = format_bytes(parse_budget(args.budget).bytes or 0)
            out.say(f"largest {args.largest} that fits {budget} at {at}: {found}")
    return 0


def _run_bench(
    target: str, args: argparse.Namespace, out: _Output, directory: Path | None, strict: bool
) -> tuple[dict[str, Any], bool]:
    import memfit
    from memfit.models import describe
    from memfit.planning.frontier import frontier
    from memfit.report.plot import pareto_plot
    from memfit.report.tables import bench_table, seed_metrics
    from memfit.verbs.bench import bench

    budgets = _budgets(args.budgets)
    model, sample = _load(target, args, strict)
    with out.progress(f"{target}") as update:
        update("profiling")
        prof = memfit.profile(
            model, sample, repeats=args.repeats, thorough=args.thorough, keep_output=_keep(args)
        )
        rows = args.repeats or 3
        result = bench(model, sample, prof, budgets=budgets, repeats=rows, progress=update)
    title = f"{target}: {describe(model)} on {_machine()}"
    data: dict[str, Any] = {
        "target": target,
        "model": describe(model),
        "machine": _machine(),
        "result": result.to_dict(),
        "metrics": seed_metrics(result),
    }
    if not out.as_json:
        out.show(bench_table(result, title))
        metrics = data["metrics"]
        if metrics:
            out.say(
                f"best trade: {metrics['memory_saved_pct']:.0f}% activation memory saved for "
                f"{metrics['recompute_overhead_pct']:+.1f}% step time; "
                f"{metrics['parameters_per_gib_of_peak'] / 1e6:.1f}M parameters per GiB of peak"
            )
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            png = pareto_plot(
                result,
                frontier(prof.costs),
                directory / f"{_slug(target)}.png",
                recompute_frontier=frontier(prof.costs.keep_only()),
                title=title,
            )
            data["plot"] = str(png)
        except ImportError:
            out.say("matplotlib is not installed: no plot (pip install memfit[plot])")
        (directory / f"{_slug(target)}.json").write_text(json.dumps(data, indent=1, default=str))
    ok = all(row.gradients_equal for row in result.rows if row.feasible)
    return data, ok


def _slug(target: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in target).strip("-")


def _cmd_bench(args: argparse.Namespace, out: _Output) -> int:
    _output_folder(args.out, "--out")
    directory = Path(args.out) if args.out else None
    data, ok = _run_bench(args.target, args, out, directory, strict=True)
    if out.as_json:
        out.json(data)
    return 0 if ok else 1


def _cmd_demo(args: argparse.Namespace, out: _Output) -> int:
    _output_folder(args.out, "--out")
    _budgets(args.budgets)
    directory = Path(args.out)
    results = []
    ok = True
    for target in args.models.split(","):
        data, target_ok = _run_bench(target.strip(), args, out, directory, strict=False)
        results.append(data)
        ok = ok and target_ok
    if out.as_json:
        out.json(results)
    else:
        out.say(f"results and plots written to {directory}/")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memfit", description="Fit PyTorch training in less memory (activation checkpointing)."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    def target_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        families = ", ".join(f"hf:{name}" for name in sorted(FAMILIES))
        sub.add_argument("target", help=f"gpt, mlp, {families} or file.py:function")
        _add_sizes(sub)
        return sub

    def _add_sizes(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--layers", type=_positive, help="number of blocks")
        sub.add_argument("--width", type=_positive, help="hidden size")
        sub.add_argument("--seq", type=_positive, help="sequence length")
        sub.add_argument("--batch", type=_positive, help="batch size")
        sub.add_argument("--heads", type=_positive, help="attention heads (gpt and hf:* targets)")
        sub.add_argument(
            "--repeats",
            type=_positive,
            help="timed steps per way of running the model, in turns (default: one metered and "
            "one timed step each; 3 with --thorough; bench: 3 per row)",
        )
        sub.add_argument(
            "--thorough",
            action="store_true",
            help="profile with 3 timed steps per way in turns (about 3x the setup time)",
        )
        sub.add_argument("--json", action="store_true", help="print JSON on stdout")
        sub.add_argument(
            "--drop-output",
            action="store_true",
            help="plan for a loop that keeps only the loss (default: the model's output stays "
            "alive through backward, as in `out = model(**b); out.loss.backward()`)",
        )

    inexact_help = (
        "also measure options that are not bit for bit: exact to rounding (head:chunked: head "
        "and loss fused in chunks of tokens, the lowest floor on large vocabularies) and lossy "
        "(compress:bf16, compress:fp8: saved activations stored in fewer bits); plans that use "
        "one say so"
    )
    sub = target_command("profile", "measure every stage of a model")
    sub.add_argument("-o", "--output", help="write the profile as JSON")
    sub.add_argument("--inexact", action="store_true", help=inexact_help)
    sub.set_defaults(run=_cmd_profile)
    sub = target_command("plan", "plan a model for a memory budget")
    sub.add_argument("--budget", required=True, help='e.g. "40%%" or "12GiB"')
    sub.add_argument(
        "--strategy",
        default="optimal",
        help="optimal, none, all, all+offload (CUDA), sqrt, every:k",
    )
    sub.add_argument(
        "--host-budget",
        help='host memory offloaded activations may take (CUDA), e.g. "64GiB"; default: half '
        "of the free host memory (checked everywhere; unused where nothing can be offloaded, "
        "as on CPU)",
    )
    sub.add_argument(
        "--candidates",
        type=_positive,
        default=1,
        help="time this many plans within the budget on the model, side by side, and keep "
        "the fastest (default 1: the optimal plan of the predicted costs, untimed)",
    )
    sub.add_argument("-o", "--output", help="write the plan as JSON")
    sub.add_argument("--inexact", action="store_true", help=inexact_help)
    sub.add_argument(
        "--max-error",
        type=float,
        help="with --inexact: the largest relative gradient error of a parameter group that a "
        "lossy option may bring, as measured on the sample (e.g. 0.01); options above it are "
        "left out",
    )
    sub.set_defaults(run=_cmd_plan)
    sub = commands.add_parser("estimate", help="predict peak and time at shapes never run")
    sub.add_argument("target", help="gpt, mlp, hf:<arch> or file.py:function")
    sub.add_argument("--layers", type=_positive, help="number of blocks")
    sub.add_argument("--width", type=_positive, help="hidden size")
    sub.add_argument("--heads", type=_positive, help="attention heads (gpt and hf:* targets)")
    sub.add_argument(
        "--seq", dest="shape_seq", type=_sizes_list, help="sequence lengths, e.g. 512,1024,2048"
    )
    sub.add_argument("--batch", dest="shape_batch", type=_sizes_list, help="batch sizes, e.g. 8")
    sub.add_argument("--budget", help='plan each shape for it, e.g. "50%%" or "12GiB"')
    sub.add_argument(
        "--strategy",
        default="optimal",
        help="optimal, none, all, all+offload (CUDA), sqrt, every:k",
    )
    sub.add_argument(
        "--largest",
        choices=("seq", "batch"),
        help="also find the largest seq (at the first batch) or batch that fits --budget (bytes)",
    )
    sub.add_argument("--repeats", type=_positive, default=3, help="timed steps per measurement")
    sub.add_argument("--json", action="store_true", help="print JSON on stdout")
    sub.add_argument("--drop-output", action="store_true", help="plan for a loop keeping the loss")
    sub.set_defaults(run=_cmd_estimate)
    sub = target_command("bench", "run strategies and budgets side by side")
    sub.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated budgets")
    sub.add_argument("--out", help="folder for the plot and JSON")
    sub.set_defaults(run=_cmd_bench)
    sub = commands.add_parser("demo", help="built-in models, every strategy, for real")
    _add_sizes(sub)
    sub.add_argument("--models", default=",".join(DEMO_MODELS), help="comma-separated targets")
    sub.add_argument("--budgets", default=DEFAULT_BUDGETS, help="comma-separated budgets")
    sub.add_argument("--out", default="memfit-out", help="folder for plots and JSON")
    sub.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    # The profiler's start/stop lines on stderr (two per metered step) would bury the output.
    # The command owns its process; the library never sets this.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    out = _Output(as_json=getattr(args, "json", False))
    try:
        code: int = args.run(args, out)
        return code
    except UsageError as error:
        if args.debug and error.__cause__ is not None:
            raise error.__cause__ from None
        _error(f"{error} (run with --debug for the traceback)", args.debug)
        return 2
    except (InfeasibleBudgetError, MemfitError) as error:
        _error(str(error), args.debug)
        return 1
    except Exception as error:
        # raised while running: by the user's model (its forward, its loss) or deep inside
        _error(f"{type(error).__name__}: {error} (run with --debug for the traceback)", args.debug)
        return 1


def _error(message: str, debug: bool) -> None:
    if debug:
        raise
    print(f"memfit: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
