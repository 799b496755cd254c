"""The validator's options, declared once: ``tiersim validate`` (typer) and ``python -m tiersim.validator``
(argparse, for a GPU machine without typer) are both built from :class:`ValidateOptions`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tiersim.hierarchy.strategies import CACHE_STRATEGIES
from tiersim.options import option

#: The decode grid timed when none is given (CLI, ``python -m tiersim.validator`` and ``run_validation``).
DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_CONTEXTS = (2048, 8192)
DEFAULT_HBM = (1.0, 0.5, 0.25)


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ValidateOptions:
    """The decode grid to time, how to time it, and the files it reads and writes."""

    model_shape: str | None = option(None, "model shape built with random bf16 weights (see tiersim.validator.shapes); "
                                     "default: r1-distill-qwen-7b on CUDA, tiny with --device cpu", show_default=False)
    batch: str = option(_csv(DEFAULT_BATCHES), "batch sizes, comma-separated", items=int, min=1, max=4096)
    context: str = option(_csv(DEFAULT_CONTEXTS), "context lengths (tokens in the cache before decoding)", items=int,
                          min=1, max=1_048_576)
    hbm: str = option(_csv(DEFAULT_HBM), "HBM ratios; the rest of the context goes to DDR", items=float, min=0, max=1)
    device: str = option("cuda", "cuda (default), cuda:N, or cpu for the smoke mode")
    steps: int = option(24, "timed decode steps per point", min=1, max=100_000)
    warmup: int = option(4, "untimed decode steps before timing", min=1, max=100_000)
    prefill: str = option("synthetic", "synthetic (random K/V, no forward) or model (a real prefill)",
                          choices=("synthetic", "model"))
    budget_s: float | None = option(None, "seconds for the decode grid; later points are skipped", min=1e-3)
    sdpa: str = option("no-cudnn", "attention kernels: no-cudnn (cuDNN builds a plan per new KV length) or default",
                       choices=("no-cudnn", "default"))
    executor: str = option("hf", "hf (HF eager generate over TieredCache: measures a host-bound engine) or graph "
                           "(the step captured once as a CUDA graph and replayed; eager on CPU)",
                           choices=("hf", "graph"))
    strategy: str = option("prefetch", "how the DDR tier reaches attention (--executor graph): prefetch, "
                           "host-attention (attended on CPU threads, merged by log-sum-exp) or hybrid "
                           "(--fetch-share of it fetched, the rest on the host)", choices=CACHE_STRATEGIES)
    fetch_share: float | None = option(None, "hybrid: the share of the DDR tier fetched to the GPU (default 0.5; "
                                       "--executor graph: of the DDR buffer's capacity, its largest count in the "
                                       "run, so of the tokens held a little less)",
                                       min=0, max=1, show_default=False)
    compressed: float = option(0.0, "--executor graph: after the grid, its first batch and context again at each HBM "
                               "< 1 ratio with this share of the context in the compressed tier (at most what leaves "
                               "HBM; the rest of it in DDR)", min=0, max=1)
    strategy_check: str = option("", "--executor graph, --strategy prefetch: after the grid's first batch and "
                                 "context, its first HBM < 1 ratio again with each of these strategies "
                                 "(comma-separated: host-attention, hybrid at fetch share 0.5), against that "
                                 "block's HBM 1.0 baseline", show_default=False)
    profile: Path | None = option(None, "operator profile (python -m tiersim.validator.operators) for the predictions")
    out: Path | None = option(None, "calibration JSON to write, e.g. docs/validation/h100.json", output=(".json",))
    compare: Path | None = option(None, "print measured vs simulated from this calibration JSON")


def executor_options(executor: str, strategy: str, fetch_share, compressed: float, strategy_check: str = "") -> dict:
    """The options only the graph executor takes, as ``run``'s keyword arguments. The HF harness times prefetch over
    lossless splits only: another ``--strategy``, a ``--fetch-share`` or a ``--compressed`` share for it is refused
    in one line rather than silently dropped; the graph executor checks its own (graph_host.strategy_options)."""
    from tiersim.errors import TiersimError

    if executor == "graph":
        return {"strategy": strategy, "fetch_share": fetch_share, "compressed": compressed,
                "strategy_check": strategy_check}
    if strategy != "prefetch" or fetch_share is not None:
        flag = f"--strategy {strategy}" if strategy != "prefetch" else f"--fetch-share {fetch_share:g}"
        raise TiersimError(f"{flag}: the hf executor times prefetch only; use --executor graph")
    if compressed:
        raise TiersimError(f"--compressed {compressed:g}: the hf executor times lossless splits only; "
                           "use --executor graph")
    if strategy_check:
        raise TiersimError(f"--strategy-check {strategy_check}: the hf executor times prefetch only; "
                           "use --executor graph")
    return {}


def check_compare_alone(compare, values, defaults) -> None:
    """``--compare`` prints a calibration already measured and runs nothing, so every other option given beside
    it (``--batch``, ``--strategy``, ``--out``, ...) would be silently dropped: refused in one line that names
    them all, so the user fixes the command once. ``values`` and ``defaults``: each :class:`ValidateOptions`
    field as the front end holds it (typer: the text; argparse: the parsed lists), so a default typed out
    again is not refused. The one check of what --compare drops: an option added to the group is covered."""
    from tiersim.errors import TiersimError
    from tiersim.options import flag

    if compare is None:
        return
    given = []
    for field in dataclasses.fields(ValidateOptions):
        if field.name != "compare" and values[field.name] != defaults[field.name]:
            value = values[field.name]
            given.append((flag(field), f"{flag(field)} {_csv(value) if isinstance(value, (list, tuple)) else value}"))
    if given:
        words = given[0][1] if len(given) == 1 else ", ".join(g for _, g in given[:-1]) + f" and {given[-1][1]}"
        verb, drop = ("is", given[0][0]) if len(given) == 1 else ("are", "them")
        raise TiersimError(f"{words} {verb} for a new run; --compare only prints {compare}: drop {drop} "
                           "or --compare")
