"""Per-operator time tables on the user's GPU: the inputs of the simulator's profile-driven compute model.

A decode step is a fixed list of operators per layer (RMSNorm, q/k/v/o GEMMs, RoPE, the KV
append, attention, SiLU*mul, gate/up/down GEMMs, residual adds) plus a few per step (embedding
gather, rotary table, final norm, LM head). This module times each of them in isolation with the
model's real shapes and transformers' own functions, so the simulator can price any batch and
context by interpolation instead of a roofline, and separately times whole HF eager decode steps
to learn the per-step host overhead that no operator table contains.

Two numbers per operator row: ``device_us``, the GPU time per call (a CUDA graph of back-to-back
calls replayed and timed with events, so launch gaps are excluded), and ``host_us``, the CPU
time to issue one eager call. Inputs and weights rotate over several copies (at least
``ROTATE_BYTES`` in all, at most one per layer) so the L2 cache does not serve a weight or a KV
block that the real model would read from HBM. Writes one JSON (kind ``operator-profile``).

Entry point: ``python -m tiersim.validator.operators --shape r1-distill-qwen-7b,llama-3.1-8b --out FILE``.
Imports torch, numpy, transformers and the standard library only (the GPU machine has no simpy,
plotly, rich or typer). ``--device cpu`` is the smoke mode: same code path, tiny shape, seconds.

The work is split by job: ``operators_timing`` (the clock, rotation, budget), ``operators_tables``
(GEMM, small-op and attention tables), ``operators_decode`` (whole HF decode steps); this module
runs them per shape, writes the file and prints the short table; import a name from the module that
defines it.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time

import torch

from tiersim import fileformat
from tiersim.errors import TiersimError
from tiersim.validator.operators_decode import decode_table
from tiersim.validator.operators_tables import attention_table, gemm_table, small_op_table
from tiersim.validator.operators_timing import MIN_CALLS, REPS, ROTATE_BYTES, Budget, OpTimer, free, frozen_heap
from tiersim.validator.sdpa import SDPA_CHOICES

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ATTN_BATCHES = (1, 2, 4, 8, 16, 32, 64)
ATTN_CONTEXTS = (512, 1024, 2048, 4096, 8192, 16384)
DECODE_POINTS = ((1, 2048), (8, 2048), (32, 2048), (1, 8192), (8, 8192), (32, 8192))
SMOKE = {"tokens": (1, 4, 16), "batches": (1, 2), "contexts": (64, 128), "decode": ((1, 96), (2, 96))}


# -- the run ---------------------------------------------------------------------------------------
def profile_shape(shape, dev, dtype, budget: Budget, grid: dict, log, steps: int, warmup: int) -> dict:
    """Every table for one model shape (sections past the budget are listed under ``skipped``)."""
    from tiersim.validator.shapes import build_model, parameter_count

    timer = OpTimer(dev)
    skipped: list[str] = []
    out = {"shape": {**shape.to_dict(), "params": parameter_count(shape)}, "skipped": skipped,
           "gemm": [], "small": [], "attention": [], "decode": [], "decode_compare": []}

    def guarded(section: str, fn):
        """Run one section; a failure is recorded and the next section still runs (a borrowed GPU
        must always end with a file)."""
        try:
            return fn()
        except TiersimError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the file, the run goes on
            skipped.append(f"{section}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
            log(f"  {skipped[-1]}")
            free(dev)
            return None

    log(f"{shape.name}: GEMMs (q/k/v/o, gate/up/down, LM head) at {len(grid['tokens'])} token counts")
    out["gemm"] = guarded("gemm", lambda: gemm_table(shape, grid["tokens"], timer, budget, dtype, skipped)) or []
    log(f"{shape.name}: small ops")
    out["small"] = guarded("small ops", lambda: small_op_table(shape, grid["tokens"], timer, budget, dtype, skipped)) or []
    log(f"{shape.name}: decode attention and KV append, {len(grid['batches'])} batches x {len(grid['contexts'])} contexts")
    out["attention"] = guarded("attention", lambda: attention_table(
        shape, grid["batches"], grid["contexts"], timer, budget, dtype, skipped)) or []
    if budget.spent():
        skipped.append("decode steps: time budget spent")
        return out
    log(f"{shape.name}: building the model (random {str(dtype).removeprefix('torch.')} weights) for decode steps")

    def decode_section():
        model = build_model(shape, dev, dtype=dtype)
        try:
            return decode_table(model, grid["decode"], (1.0, 0.5), budget, steps, warmup, grid["profile_steps"],
                                skipped, log)
        finally:
            del model
            free(dev)

    out["decode"], out["decode_compare"] = guarded("decode", decode_section) or ([], [])
    return out


def check_args(shapes: list[str], budget_s: float | None, steps: int, warmup: int, out) -> None:
    from tiersim.validator.calibrate import check_out
    from tiersim.validator.shapes import get_shape

    for name in shapes:
        get_shape(name)
    if not shapes:
        raise TiersimError("--shape: give at least one shape")
    if budget_s is not None and not budget_s > 0:
        raise TiersimError(f"--budget-s must be > 0 seconds, got {budget_s!r}")
    if steps < 1 or warmup < 1:
        raise TiersimError(f"--steps and --warmup must be >= 1, got {steps} and {warmup}")
    check_out(out)


def run(shapes: list[str], device: str = "cuda", out=None, budget_s: float | None = 240.0, steps: int = 10,
        warmup: int = 3, command: str | None = None, log=lambda _m: None) -> dict:
    """Profile every shape (each gets an equal share of what is left of the budget); write ``out`` atomically."""
    from tiersim.validator.calibrate import base_gpu_preset, device_info, resolve_device, single_threaded_cpu
    from tiersim.validator.shapes import get_shape

    check_args(shapes, budget_s, steps, warmup, out)
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    grid = ({"tokens": TOKENS, "batches": ATTN_BATCHES, "contexts": ATTN_CONTEXTS, "decode": DECODE_POINTS,
             "profile_steps": 3} if cuda else {**SMOKE, "profile_steps": 1})
    info = device_info(dev)
    log(f"device: {info['name']} (torch {info['torch']}, CUDA {info['cuda']}, driver {info['driver']})")
    started = time.monotonic()
    models = {}
    import transformers.modeling_utils  # noqa: F401  (loaded before the heap is frozen: what every table imports)

    with single_threaded_cpu(dev), frozen_heap():
        for n, name in enumerate(shapes):
            left = None if budget_s is None else budget_s - (time.monotonic() - started)
            share = None if left is None else max(left, 0.0) / (len(shapes) - n)
            models[name] = profile_shape(get_shape(name), dev, dtype, Budget(share), grid, log, steps, warmup)
    doc = {
        **fileformat.header(fileformat.OPERATOR_PROFILE),
        "command": command,
        "device": info,
        "gpu_preset": base_gpu_preset(info["name"] if cuda else None),
        "settings": {"dtype": str(dtype).removeprefix("torch."), "sdpa_choices": list(SDPA_CHOICES),
                     "cudnn_sdp_enabled": bool(getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)()),
                     "rotate_bytes": ROTATE_BYTES, "min_calls": MIN_CALLS,
                     "reps": REPS, "decode_steps": steps, "decode_warmup": warmup, "budget_s": budget_s,
                     "grid": {k: [list(p) for p in v] if k == "decode" else (list(v) if isinstance(v, tuple) else v)
                              for k, v in grid.items()},
                     "elapsed_s": time.monotonic() - started},
        "models": models,
    }
    if out is not None:
        fileformat.write_document(out, doc)
        log(f"wrote {out}")
    return doc


# -- the short table -------------------------------------------------------------------------------
def format_text(doc: dict) -> str:
    lines = [f"operator profile: {doc['device']['name']} | torch {doc['device']['torch']} | "
             f"{doc['settings']['elapsed_s']:.0f} s"]
    for name, m in doc["models"].items():
        lines.append(f"\n{name}: device us per call (host us per call) by tokens")
        ops: dict[str, dict] = {}
        for r in m["gemm"] + m["small"]:
            ops.setdefault(r["op"], {})[r["tokens"]] = r
        shown = [t for t in doc["settings"]["grid"]["tokens"] if t in (1, 8, 64, 512) or len(doc["settings"]["grid"]["tokens"]) <= 4]
        lines.append(f"{'op':>14}  " + "  ".join(f"{t:>16}" for t in shown))
        for op, by_t in ops.items():
            cells = [f"{by_t[t]['device_us']:8.1f} ({by_t[t]['host_us']:5.1f})" if t in by_t else f"{'-':>16}"
                     for t in shown]
            lines.append(f"{op:>14}  " + "  ".join(cells))
        attn = [r for r in m["attention"] if r["op"] == "sdpa_decode"]
        if attn:
            lines.append("decode attention device us (batch x context): " + ", ".join(
                f"{r['batch']}x{r['context']}={r['device_us']:.0f}" for r in attn
                if r["batch"] in (1, 8, 32) and r["context"] in (2048, 8192, 128)))
        for r in m["decode"] + [c for c in m["decode_compare"] if c["cache"] == "tiered"]:
            k = r["gpu_kernel_ms"]
            lines.append(f"decode {r['cache']:>7} sdpa {r.get('sdpa', 'default'):>8} hbm {r['hbm']:.2f} "
                         f"batch {r['batch']:>3} context {r['context']:>5}: "
                         f"step {r['step_ms']:7.2f} ms, cpu issue {r['cpu_issue_ms']:7.2f} ms, "
                         f"kernels {k if k is not None else float('nan'):7.2f} ms")
        for c in m["decode_compare"]:
            lines.append(f"top self-CPU ops, {c['cache']} hbm {c['hbm']:g} sdpa {c.get('sdpa', 'default')} "
                         f"(batch {c['batch']}, context {c['context']}):")
            for op in (c.get("top_ops_by_self_cpu") or [])[:6]:
                lines.append(f"  {op['self_cpu_us_per_step']:9.0f} us/step self CPU  {op['calls_per_step']:7.1f} calls  "
                             f"{op['self_device_us_per_step']:8.0f} us device  {op['name'][:60]}")
            for fn in (c.get("top_python_by_self_time") or [])[:3]:
                lines.append(f"  {fn['self_ms_per_step'] * 1e3:9.0f} us/step python   {fn['calls_per_step']:7.1f} calls  "
                             f"{fn['function'][-70:]}")
        if m["skipped"]:
            lines.append(f"skipped: {len(m['skipped'])} ({m['skipped'][0]}{', ...' if len(m['skipped']) > 1 else ''})")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tiersim.validator.operators", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="r1-distill-qwen-7b",
                   help="comma-separated shapes from tiersim.validator.shapes.SHAPES (tiny for the smoke mode)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke mode)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="seconds for everything, shared equally by the shapes; sections past it are skipped")
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per point")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--out", default=None, help="operator-profile JSON to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tiersim.validator.calibrate import NoDeviceError

    argv = sys.argv[1:] if argv is None else argv
    shapes = [s.strip() for s in args.shape.split(",") if s.strip()]
    try:
        doc = run(shapes, device=args.device, out=args.out, budget_s=args.budget_s, steps=args.steps,
                  warmup=args.warmup, command=shlex.join(["python", "-m", "tiersim.validator.operators", *argv]),
                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except NoDeviceError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except TiersimError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(format_text(doc))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
