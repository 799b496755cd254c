"""``python -m tiersim.validator``: the validator without typer or rich (the GPU machine may lack them).

The same options as ``tiersim validate``: both are built from ``tiersim.validator.options.ValidateOptions``.
Bad input: one ``error:`` line and exit code 2; no CUDA device (without ``--device cpu``): one
``no CUDA device: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from tiersim.errors import TiersimError
from tiersim.options import add_arguments
from tiersim.validator.options import ValidateOptions, check_compare_alone, executor_options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tiersim.validator", description=__doc__.splitlines()[0])
    add_arguments(p, ValidateOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tiersim.validator import calibrate, compare

    try:
        if args.compare:
            check_compare_alone(args.compare, vars(args), vars(parser().parse_args([])))
            print(compare.format_text(compare.load(args.compare)))
            return 0
        argv = sys.argv[1:] if argv is None else argv
        extra = executor_options(args.executor, args.strategy, args.fetch_share, args.compressed, args.strategy_check)
        run = calibrate.run_validation
        calibrate.raise_on_sigterm()  # a timeout's SIGTERM still leaves the graph grid's file, with what it measured
        if args.executor == "graph":
            from tiersim.validator.graph_run import run_validation_graph as run
        doc = run(
            args.model_shape, args.batch, args.context, args.hbm, device=args.device, steps=args.steps,
            warmup=args.warmup, prefill=args.prefill, out=args.out, budget_s=args.budget_s, sdpa=args.sdpa,
            profile=args.profile,
            command=shlex.join(["python", "-m", "tiersim.validator", *argv]),
            log=lambda msg: print(msg, file=sys.stderr, flush=True), **extra,
        )
        print(compare.format_text(doc))
        return 0
    except calibrate.NoDeviceError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except calibrate.Terminated as exc:  # the step's timeout: the graph grid's file is written; one line, not a trace
        print(f"error: {exc}", file=sys.stderr)
        return 128 + signal.SIGTERM  # as a process killed by SIGTERM reports itself
    except TiersimError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
