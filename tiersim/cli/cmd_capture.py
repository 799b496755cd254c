"""`tiersim capture` and `tiersim synth`: make traces from real runs, or extrapolate them."""

from __future__ import annotations

from pathlib import Path

import typer

from tiersim.cli import options
from tiersim.cli.app import THREADS_HELP, app, apply_threads, console, err_console
from tiersim.cli.groups import CacheShape, ModelRun
from tiersim.cli.progress import meter
from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig
from tiersim.traces.lengths import MAX_LAYERS, MAX_SEQUENCES, MAX_SIGMA

#: Bounds of capture's sizes: far beyond any CPU run, small enough that a typo stops before the model loads.
MAX_PROMPTS = 100_000
MAX_NEW_TOKENS = 1_000_000
# The paper's headline configuration: half the context in HBM, 3% evicted, the rest in DDR.
HEADLINE = {"hbm": 0.5, "ddr": 0.47, "compressed": 0.0, "evict": 0.03}


@app.command()
@options.command(outputs={"out": (".parquet",)}, example=["--n", "1", "--max-new-tokens", "1"], loads_model=True)
def capture(
    runtime: ModelRun = ModelRun(),
    prompts: Path = typer.Option(None, help="JSONL with a 'prompt' field per line (default: bundled prompts)"),
    n: int = options.opt(8, help="number of prompts to run (at most the prompt file's; the bundled set has 36)",
                         min=1, max=MAX_PROMPTS),
    max_new_tokens: int = options.opt(128, "--max-new-tokens", help="tokens generated per prompt", min=1,
                                      max=MAX_NEW_TOKENS),
    hbm: float = options.opt(HEADLINE["hbm"], help="share of the context kept in HBM", min=0, max=1),
    ddr: float = options.opt(HEADLINE["ddr"], help="share offloaded to DDR (exact, prefetched)", min=0, max=1),
    compressed: float = options.opt(HEADLINE["compressed"], help="share held quantized", min=0, max=1),
    evict: float = options.opt(HEADLINE["evict"], help="share evicted for good", min=0, max=1),
    shape: CacheShape = CacheShape(),
    full: bool = typer.Option(False, "--full", help="also keep every step's attention row (large; for offline replay)"),
    out: Path = typer.Option(Path("trace.parquet"), help="output Parquet trace"),
    threads: int = options.opt(0, help=THREADS_HELP, min=0, max=4096),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="keep each finished sequence in OUT.parts/ "
                                "and reuse them when the same command runs again after an interruption"),
) -> None:
    """Run a real model under the tier policy and write a trace (per step, per layer)."""
    from tiersim.prompts import load_prompts

    model, device, dtype = runtime.model, runtime.device, runtime.dtype
    config = TierConfig(hbm=hbm, ddr=ddr, compressed=compressed, evict=evict, **shape.config_options())
    items = load_prompts(str(prompts) if prompts else None, n)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TiersimError("--device cuda: no CUDA device is available here")
    from tiersim.models import check_context_without_weights, describe_model, load_model
    from tiersim.traces import write
    from tiersim.traces.capture import capture as run_capture, check_fits

    check_context_without_weights(model, None, items, max_new_tokens)  # the config and tokenizer: before the weights
    used = apply_threads(threads)
    with console.status(f"loading {model} ({used} CPU thread{'s' * (used > 1)}) ..."):
        mdl, tokenizer = load_model(model, device=device, dtype=dtype)
    prompt_tokens = max(len(p.prompt) for p in items) + 64  # a token per character at most, and the template's
    check_fits(len(items), prompt_tokens, max_new_tokens, describe_model(mdl), full, 4 if dtype == "float32" else 2)
    parts = _parts(out, model, device, dtype, config, max_new_tokens, full, prompts, resume)
    source = str(prompts) if prompts else "bundled"
    todo = [(i, p) for i, p in enumerate(items) if not parts.done(p.id)]
    if len(parts):
        err_console.print(f"resuming from {parts.path}: {len(items) - len(todo)} of {len(items)} sequences are "
                          "already captured", highlight=False, markup=False)
    try:
        with meter("capture", len(todo), eta=False) as progress:

            def advance(result):
                rate = result.new_tokens / max(result.seconds, 1e-9)
                progress.advance(f"{result.prompt_id}: {rate:.1f} tok/s")

            for index, item in todo:  # one prompt at a time: each finished sequence is kept at once
                parts.add(index, run_capture(mdl, tokenizer, [item], config, max_new_tokens, describe_model(mdl),
                                             device=device, prompts_source=source, on_sequence=advance, full=full))
    except KeyboardInterrupt:  # app.run prints this one line and exits 130
        raise KeyboardInterrupt(f"capture kept {len(parts)} of {len(items)} sequences in {parts.path}; {out} was "
                                "not written: run the same command again to resume") from None
    trace = parts.merge([p.id for p in items])
    write(out, trace.steps, trace.meta)
    parts.discard()  # --out holds everything now
    console.print(
        f"wrote {out} ({len(items)} sequence{'s' * (len(items) != 1)}, {len(trace.steps):,} rows, "
        f"{out.stat().st_size / 1e6:.2f} MB)", highlight=False, markup=False,
    )


def _parts(out, model, device, dtype, config, max_new_tokens, full, prompts, resume):
    """The finished sequences kept beside ``out`` (tiersim.traces.resume), keyed by what decides them."""
    import hashlib

    import tiersim
    from tiersim.traces.resume import CaptureParts

    source = "bundled" if prompts is None else hashlib.sha256(Path(prompts).read_bytes()).hexdigest()
    context = {"model": str(Path(model).resolve()) if Path(model).is_dir() else model, "device": device,
               "dtype": dtype, "policy": config.to_dict(), "max_new_tokens": max_new_tokens, "full": full,
               "prompts": source, "tiersim": tiersim.__version__}
    return CaptureParts(out, context, resume=resume)


@app.command()
@options.command(outputs={"out": (".parquet",)}, example=["--n", "1", "--lengths", "8"])
def synth(
    trace: Path = typer.Option(None, help="captured trace to fit (default: the bundled trace)"),
    lengths: str = typer.Option("math500", help="mean generated tokens: a number or gsm8k/math500/amc23/gpqa/aime"),
    n: int = options.opt(4, help="number of synthetic sequences", min=1, max=MAX_SEQUENCES),
    layers: int = options.opt(None, help="layers of the synthetic model (default: the trace's)", min=1,
                              max=MAX_LAYERS),
    sigma: float = options.opt(0.35, help="log-normal spread of the lengths (above 2 most sequences would be a "
                               "few tokens long)", min=0, max=MAX_SIGMA),
    seed: int = options.opt(0, help="seed of the lengths and the per-step draws", min=0, max=2**32 - 1),
    out: Path = typer.Option(Path("synthetic.parquet"), help="output Parquet trace"),
) -> None:
    """Extrapolate a captured trace's statistics to reasoning lengths no CPU capture reaches."""
    from tiersim.traces import default_trace_path, read, write
    from tiersim.traces.synth import fit, parse_lengths, synthesize

    source = read(trace or default_trace_path())
    result = synthesize(fit(source), n=n, mean_length=parse_lengths(lengths), sigma=sigma, num_layers=layers, seed=seed)
    write(out, result.steps, result.meta)
    console.print(f"wrote {out} ({n} sequence{'s' * (n != 1)}, {len(result.steps):,} rows)", highlight=False, markup=False)
