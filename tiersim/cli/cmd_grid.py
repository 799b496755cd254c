"""`tiersim grid`: output quality over HBM ratio x eviction ratio, against the eviction baselines."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tiersim.cli import options
from tiersim.cli.app import (
    RAY_ADDRESS_HELP, THREADS_HELP, add_columns, app, apply_threads, compact_table, console, deliver,
    err_console, parse_float_list,
)
from tiersim.cli.groups import STRATEGY_HELP, CacheShape, ModelRun
from tiersim.cli.progress import meter
from tiersim.errors import TiersimError
from tiersim.hierarchy import registry as policies

DEFAULT_BASELINES = ",".join(sorted(policies.BASELINE_NAMES))  # every eviction baseline (the policy registry's)
DEFAULT_STRATEGY = CacheShape.strategy  # what an empty --strategy list runs
RAY_HELP = ("run every generation as a task on Ray, the model loaded once per worker (needs "
            "pip install 'tiersim\\[cluster]'; see docs/cluster.md)")


def parse_baselines(text: str) -> list[str]:
    """'h2o,rkv' -> names; '' or 'none' -> no baselines (names are checked when the cells are built)."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    return [] if names in ([], ["none"]) else names


@app.command()
@options.command(outputs={"out": (".json", ".parquet"), "report": (".html", ".htm")}, help={"strategy": "how the DDR tier reaches attention (a comma list: the first runs the hierarchy's "
                                   "cells, each further one adds its cells that hold DDR tokens, as "
                                   f"hierarchy/<strategy>): {STRATEGY_HELP}"},
                 example=["--n", "1", "--max-new-tokens", "1"], loads_model=True)
def grid(
    runtime: ModelRun = ModelRun(),
    prompts: Path = typer.Option(None, help="JSONL with a 'prompt' (and optional 'answer') per line; default: bundled"),
    n: int = options.opt(10, help="number of prompts (at most the prompt file's; the bundled set has 36)", min=1,
                         max=100_000),
    max_new_tokens: int = options.opt(64, "--max-new-tokens", help="tokens generated per prompt and cell", min=1,
                                      max=1_000_000),
    hbm: str = typer.Option("1.0,0.5,0.25", help="HBM ratios (grid rows; baselines' budgets)"),
    evict: str = typer.Option("0,0.03,0.1", help="eviction ratios (grid columns)"),
    compressed: str = typer.Option("0", help="compressed-tier ratios"),
    baselines: str = typer.Option(DEFAULT_BASELINES, help="eviction baselines to compare ('none' for none)"),
    kvpress: str = typer.Option(None, "--kvpress", help="kvpress presses to compare at every hbm < 1, a comma list "
                                "of NAME (pruned at the prefill) or NAME@decode (also while decoding), e.g. "
                                "SnapKV, ExpectedAttention@decode; needs pip install 'tiersim\\[kvpress]'"),
    kl: bool = typer.Option(False, "--kl", help="also score every cell by its mean teacher-forced KL against the "
                            "full cache (both read the full cache's tokens; in this process, not --ray)"),
    output_format: str = options.opt("table", "--format", help="table or json (json prints only JSON)",
                                     choices=("table", "json")),
    out: Path = typer.Option(None, help="also write the grid to .json or .parquet (kind quality-grid)"),
    report: Path = typer.Option(None, help="also write an HTML report with the grid's heatmap"),
    shape: CacheShape = CacheShape(),
    resume: bool = typer.Option(True, "--resume/--no-resume",
                                help="with --out: keep finished runs in OUT.runs.jsonl and reuse them when the "
                                     "same command runs again after an interruption"),
    threads: int = options.opt(0, help=THREADS_HELP, min=0, max=4096),
    ray: bool = typer.Option(False, "--ray", help=RAY_HELP),
    ray_address: str = typer.Option(None, "--ray-address", help=RAY_ADDRESS_HELP),
    ray_workers: int = options.opt(0, "--ray-workers", min=0, max=100_000, help="--ray: model-holding workers to start "
                                    "(0: one per GPU of the cluster with --device cuda, else one per CPU)"),
) -> None:
    """Run the full cache and every cell on the same prompts; score each cell against the full cache."""
    from tiersim.prompts import load_prompts
    from tiersim.quality.grid import build_cells
    from tiersim.quality.store import grid_document, write_grid

    model, device, dtype = runtime.model, runtime.device, runtime.dtype
    if output_format not in ("table", "json"):
        raise TiersimError(f"--format must be table or json, got {output_format!r}")
    from tiersim.quality import presses

    specs = presses.parse_presses(kvpress)
    if specs:
        presses.import_kvpress()  # before any model work: without kvpress, say what to install and stop
    cells = build_cells(
        parse_float_list(hbm, "hbm"),
        parse_float_list(evict, "evict"),
        parse_float_list(compressed, "compressed"),
        parse_baselines(baselines),
        strategies=[part.strip() for part in shape.strategy.split(",") if part.strip()] or [DEFAULT_STRATEGY],
        presses=specs,
        **{k: v for k, v in shape.config_options().items() if k != "strategy"},
    )
    items = load_prompts(str(prompts) if prompts else None, n)
    ray = ray or ray_address is not None
    if kl and ray:
        raise TiersimError("--kl runs in this process (it reads every step's logits): leave out --ray")
    if ray_workers < 0:
        raise TiersimError(f"--ray-workers must be >= 0, got {ray_workers}")
    if ray_workers and not ray:
        raise TiersimError("--ray-workers needs --ray (or --ray-address): without it the grid runs here")
    if ray:
        from tiersim.cluster import import_ray

        import_ray()  # before any model work: without Ray, say what to install and stop
    elif device == "cuda":  # with --ray the GPUs are the workers', not this machine's
        import torch

        if not torch.cuda.is_available():
            raise TiersimError("--device cuda: no CUDA device is available here")

    apply_threads(threads)
    journal = _journal(out, model, device, dtype, resume)
    try:
        if ray:
            rows, summary, model_id = _run_on_ray(model, device, dtype, items, cells, max_new_tokens, journal,
                                                  ray_address, ray_workers)
        else:
            rows, summary, model_id = _run(model, device, dtype, items, cells, max_new_tokens, journal, kl)
    except BaseException as exc:
        if journal is not None and len(journal):
            journal.close()
            kept = f"{len(journal)} finished runs are kept in {journal.path}: run the same command again to resume"
            if isinstance(exc, KeyboardInterrupt):  # the one `interrupted:` line says it (cli.app.run)
                raise KeyboardInterrupt(kept) from None
            err_console.print(kept, highlight=False, markup=False)
        raise
    document = grid_document(
        rows,
        model=model_id,
        n_prompts=len(items),
        max_new_tokens=max_new_tokens,
        prompts_source=str(prompts) if prompts else "bundled",
        prompt_ids=[p.id for p in items],
        device=device,
        dtype=dtype,
        policy=shape.config_options(),
        full_cache=summary,
    )
    def write_out():
        write_grid(out, document)
        journal.discard()  # --out holds everything now
        err_console.print(f"wrote {out}", highlight=False, markup=False)

    def write_html():
        from tiersim.cli.reports import write_report

        write_report([document], report, "grid")  # names its input by this command line

    # The document (or the table) first, then the files: a full disk costs a file, never the result.
    if output_format != "json":
        console.print(grid_table(document))
    deliver(document if output_format == "json" else None, [(out, write_out), (report, write_html)])


def _journal(out, model_name, device, dtype, resume):
    """The run journal beside ``--out`` (none without it), keyed by what decides the generated tokens."""
    if out is None:
        return None
    import torch
    import transformers

    import tiersim
    from tiersim.quality.journal import RunJournal, journal_path

    model_id = str(Path(model_name).resolve()) if Path(model_name).is_dir() else model_name
    context = {"model": model_id, "device": device, "dtype": dtype, "tiersim": tiersim.__version__,
               "torch": torch.__version__, "transformers": transformers.__version__}
    journal = RunJournal(journal_path(out), context)
    if not resume:
        journal.discard()
    elif len(journal):
        err_console.print(f"resuming from {journal.path} ({len(journal)} finished runs recorded; those with "
                          "the same settings are reused)", highlight=False, markup=False)
    return journal


def _run(model_name, device, dtype, items, cells, max_new_tokens, journal=None, kl=False):
    """Load the model and run the grid under a progress bar (on stderr, so JSON stdout stays clean)."""
    from tiersim.models import check_context_without_weights, generation_kwargs, load_model
    from tiersim.quality.grid import prepare_samples, run_grid

    check_context_without_weights(model_name, None, items, max_new_tokens)  # config and tokenizer: before the weights
    with err_console.status(f"loading {model_name} ..."):
        mdl, tokenizer = load_model(model_name, device=device, dtype=dtype)
    samples = prepare_samples(tokenizer, items, device=device)
    passes = len(samples) * (len(cells) + 1)
    with meter("grid", passes * (2 if kl else 1)) as progress:

        def kl_pass(sample_id, cell) -> None:
            progress.advance(f"{sample_id} {cell.label if cell is not None else 'full cache'}: teacher-forced KL")

        rows, summary = run_grid(
            mdl, samples, cells, max_new_tokens,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            generation_kwargs=generation_kwargs(tokenizer), on_run=_advancer(progress), journal=journal, kl=kl,
            on_kl=kl_pass,
        )
    return rows, summary, getattr(mdl, "name_or_path", model_name)


def _advancer(progress, status=None):
    """The progress line after each finished run: which prompt and cell, its speed (and the workers)."""

    def advance(run) -> None:
        what = run.cell.label if run.cell is not None else "full cache"
        speed = "resumed" if run.resumed else f"{run.tokens_per_s:.1f} tok/s"
        progress.advance(f"{run.sample_id} {what}: {speed}" + (f" · {status()}" if status else ""))

    return advance


def _run_on_ray(model_name, device, dtype, items, cells, max_new_tokens, journal, address, workers):
    """The grid with every generation a Ray task: the tokenizer here, the model in each worker."""
    from functools import partial

    from tiersim.cluster import connect
    from tiersim.models import check_context_without_weights, generation_kwargs, load_model, load_tokenizer
    from tiersim.quality.distributed import RayRunner, default_workers
    from tiersim.quality.grid import prepare_samples, run_grid

    tokenizer, model_id = load_tokenizer(model_name)
    check_context_without_weights(model_name, tokenizer, items, max_new_tokens)  # before a cluster starts
    samples = prepare_samples(tokenizer, items)
    if Path(model_name).is_dir():  # workers start elsewhere: give them the absolute path
        model_name = str(Path(model_name).resolve())
    with connect(address) as ray:
        gpu = device == "cuda"
        available = default_workers(ray, gpu)  # also refuses a cluster without GPUs for --device cuda
        runner = RayRunner(ray, partial(load_model, model_name, device=device, dtype=dtype),
                           workers or available, gpu=gpu)
        with meter("grid", len(samples) * (len(cells) + 1)) as progress:
            rows, summary = run_grid(
                None, samples, cells, max_new_tokens,
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                generation_kwargs=generation_kwargs(tokenizer), on_run=_advancer(progress, runner.status),
                journal=journal, runner=runner,
            )
    return rows, summary, model_id


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def _hbm(row: dict) -> str:
    """The HBM ratio asked for, and the one that ran when eviction left less."""
    effective = row.get("hbm_effective", row["hbm"])
    return f"{row['hbm']:g}" if abs(effective - row["hbm"]) < 1e-9 else f"{row['hbm']:g} ({effective:g})"


def grid_table(document: dict) -> Table:
    """The grid as a rich table: one row per cell, the full cache's accuracy in the title."""
    full = document.get("full_cache", {})
    title = (
        f"quality vs full cache — {document['model']}, {document['n_prompts']} prompts x "
        f"{document['max_new_tokens']} tokens (full-cache accuracy {_pct(full.get('accuracy'))})"
    )
    table = compact_table(title, caption="exact: texts equal to the full cache's; diverge: mean tokens before the "
                                          "first difference; agree: same final answer")
    with_kl = any(row.get("mean_kl") is not None for row in document["rows"])
    columns = ("method", "hbm", "ddr", "compr.", "evict", "exact", "diverge", "agree", *(("KL",) if with_kl else ()),
               "accuracy", "tok/s")
    add_columns(table, columns, optional=("tok/s", "compr.", "diverge"))
    for row in document["rows"]:
        kl = (f"{row['mean_kl']:.2g}" if row.get("mean_kl") is not None else "—",) if with_kl else ()
        table.add_row(
            row["method"], _hbm(row), f"{row['ddr']:g}", f"{row['compressed']:g}", f"{row['evict']:g}",
            _pct(row["exact_match"]), f"{row['mean_tokens_to_divergence']:.1f}", _pct(row["answer_agreement"]),
            *kl, _pct(row["accuracy"]), f"{row['tokens_per_s']:.1f}",
        )
    return table
