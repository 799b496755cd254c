"""Pre-register the simulator's predictions for the GPU validation grid, before any GPU run.

    python scripts/preregister_gpu_grid.py                 # docs/validation/predicted-{h200,h100-sxm}.{json,md}
    python scripts/preregister_gpu_grid.py --replace       # after a deliberate physics change (no longer pre-registered)

The grid is read from the one place the GPU run takes it: the CUDA branch of scripts/gpu_validate.sh (its
``SHAPE=${SHAPE:-...}``, ``BATCH``, ``CONTEXT``, ``HBM``, ``STEPS``, ``WARMUP``, ``COMPRESSED`` and
``STRATEGY_CHECK`` defaults), so a changed script grid changes the predictions' grid and
tests/test_preregister.py fails until they are registered again. The predictions and the file are
tiersim.simulator.preregister's; compare a run with
``python -m tiersim.simulator.against RESULTS --preregistered docs/validation/predicted-<preset>.json``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_validate.sh"
PRESETS = ("h200", "h100-sxm")  # the H200: the machine the device tool lends; the H100 SXM: the part run before
#: The script's variables the grid is made of: (name, parse). STRATEGY_CHECK uses ``${VAR-x}`` (empty: no check).
VARIABLES = {"SHAPE": str, "BATCH": int, "CONTEXT": int, "HBM": float, "STEPS": int, "WARMUP": int,
             "COMPRESSED": float, "STRATEGY_CHECK": str}


class GridError(Exception):
    """The script's grid could not be read (one line)."""


def read_grid(text: str, source: str = "scripts/gpu_validate.sh") -> dict:
    """The CUDA run's grid from the GPU script's text: the first default of each variable after ``DEVICE=cuda``
    (the dry run's come before it). Every variable must be there and parse, or one line says which."""
    start = text.find("DEVICE=cuda")
    if start < 0:
        raise GridError(f"{source}: no DEVICE=cuda branch: the grid's defaults cannot be found")
    cuda = text[start:]
    grid: dict = {"source": source}
    for name, kind in VARIABLES.items():
        m = re.search(rf"\b{name}=\$\{{{name}:?-([^}}]*)\}}", cuda)
        if m is None:
            raise GridError(f"{source}: no {name}=${{{name}:-...}} default in the CUDA branch")
        raw = m.group(1)
        key = name.lower()
        try:
            if name in ("BATCH", "CONTEXT", "HBM", "STRATEGY_CHECK"):
                items = [v.strip() for v in raw.split(",") if v.strip()]
                grid[key] = [kind(v) for v in items]
                if not grid[key] and name != "STRATEGY_CHECK":
                    raise ValueError("empty")
            else:
                grid[key] = kind(raw)
        except ValueError:
            raise GridError(f"{source}: {name} default {raw!r} is not a {kind.__name__}"
                            f"{' list' if name in ('BATCH', 'CONTEXT', 'HBM') else ''}") from None
    return grid


def git_stamp() -> dict:
    """This writing's commit (``-dirty`` when tracked files differ from it) and time (UTC, seconds)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {"commit": commit, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/preregister_gpu_grid.py", description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default=",".join(PRESETS), help="GPU presets, comma-separated (default: h200,h100-sxm)")
    p.add_argument("--out-dir", type=Path, default=REPO / "docs" / "validation", help="where predicted-<gpu>.json/.md go")
    p.add_argument("--script", type=Path, default=SCRIPT, help="the GPU script whose grid is predicted")
    p.add_argument("--replace", action="store_true", help="overwrite predictions that changed (keeps the first "
                   "registration's commit; the new ones are not pre-registered for a run made before them)")
    args = p.parse_args(argv)
    from tiersim.atomic import write_text
    from tiersim.errors import TiersimError
    from tiersim.simulator import preregister

    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--replace"]
    command = shlex.join(["python", "scripts/preregister_gpu_grid.py", *shown])
    try:
        try:
            text = args.script.read_text(encoding="utf-8")
        except OSError as exc:
            raise GridError(f"{args.script}: cannot read the GPU script ({exc.strerror or exc})") from None
        grid = read_grid(text, args.script.relative_to(REPO).as_posix() if args.script.is_relative_to(REPO)
                         else str(args.script))
        presets = [g.strip() for g in args.gpu.split(",") if g.strip()]
        if not presets:
            raise GridError("--gpu names no preset")
        stamp = git_stamp()
        if not args.out_dir.is_dir():
            raise GridError(f"--out-dir {args.out_dir} is not a directory")
        for gpu in presets:
            doc = preregister.document(grid, gpu, stamp, command)
            path = args.out_dir / f"predicted-{gpu}.json"
            status = preregister.write(path, doc, replace=args.replace)
            # The table from the file as it now stands (an unchanged file's own stamps): the same bytes when unchanged.
            write_text(path.with_suffix(".md"), preregister.markdown(preregister.load(path)))
            head = doc["figures"]["overhead_head"]
            print(f"{path}: {status}; overhead at the head point {head['overhead_pct']:+.2f}%, prefetch share "
                  f"{doc['figures']['prefetch_share_of_peak_h2d']['share']:.2f}")
    except (GridError, TiersimError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
