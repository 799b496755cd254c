"""``python -m tiersim.validator``: the validator without typer or rich (the GPU machine may lack them).

Same options as ``tiersim validate``. Bad input: one ``error:`` line and exit code 2; no CUDA
device (without ``--device cpu``): one ``no CUDA device: ...`` line and exit code 1.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from tiersim.errors import TiersimError


def _list(kind):
    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value, got {text!r}")
        return values

    return parse


def parser() -> argparse.ArgumentParser:
    from tiersim.validator import calibrate

    p = argparse.ArgumentParser(prog="python -m tiersim.validator", description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default=None,
                   help="shape from tiersim.validator.shapes.SHAPES (default: r1-distill-qwen-7b on CUDA, tiny on cpu)")
    p.add_argument("--batch", type=_list(int), default=list(calibrate.DEFAULT_BATCHES))
    p.add_argument("--context", type=_list(int), default=list(calibrate.DEFAULT_CONTEXTS))
    p.add_argument("--hbm", type=_list(float), default=list(calibrate.DEFAULT_HBM))
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke mode)")
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per point")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--prefill", default="synthetic", help="synthetic (default) or model")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the decode grid; points left when it is spent are listed as skipped")
    p.add_argument("--sdpa", default="no-cudnn",
                   help="attention kernels: no-cudnn (default; cuDNN builds a plan per new KV length) or default")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="operator profile (python -m tiersim.validator.operators) for the simulator's predictions")
    p.add_argument("--out", default=None, help="calibration JSON to write")
    p.add_argument("--compare", default=None, metavar="FILE", help="print measured vs simulated of FILE and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tiersim.validator import calibrate, compare

    try:
        if args.compare:
            print(compare.format_text(compare.load(args.compare)))
            return 0
        argv = sys.argv[1:] if argv is None else argv
        doc = calibrate.run_validation(
            args.model_shape, args.batch, args.context, args.hbm, device=args.device, steps=args.steps,
            warmup=args.warmup, prefill=args.prefill, out=args.out, budget_s=args.budget_s, sdpa=args.sdpa,
            profile=args.profile,
            command=shlex.join(["python", "-m", "tiersim.validator", *argv]),
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
        print(compare.format_text(doc))
        return 0
    except calibrate.NoDeviceError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except TiersimError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
