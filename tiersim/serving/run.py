"""One serving run from its description, and the file it writes (kind ``serving``): the entry point the CLI,
the capacity search and the benchmarks share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from tiersim.serving import memory, metrics
from tiersim.serving.engine import Engine, EngineConfig
from tiersim.serving.stepcost import StepPricer
from tiersim.serving.workload import Requests
from tiersim.simulator.presets import GPU, Model


@dataclass(frozen=True)
class ServeSpec:
    """What is served and how: model, GPU preset, TP degree, DDR strategy, engine settings and SLOs."""

    model: Model
    gpu: GPU
    tp: int = 1
    strategy: str = "prefetch"
    engine: EngineConfig = field(default_factory=EngineConfig)
    slo: metrics.SLO = field(default_factory=metrics.SLO)

    def with_policy(self, on_full: str) -> ServeSpec:
        return replace(self, engine=replace(self.engine, on_full=on_full))

    def describe(self) -> dict:
        e = self.engine
        return {"model": self.model.name, "gpu": self.gpu.name, "tp": self.tp, "strategy": self.strategy,
                "on_full": e.on_full, "max_batch": e.max_batch, "token_budget": e.token_budget,
                "spill_cap": e.spill_cap, "max_tokens": e.max_tokens, "oracle": e.on_full == memory.ORACLE,
                "tiers": e.tiers.ratios() | e.tiers.structure(), "slo": asdict(self.slo),
                "engine_overhead": self.gpu.engine or "none (device time only)"}


@dataclass
class Result:
    spec: ServeSpec
    requests: Requests
    engine: Engine
    rows: dict[str, np.ndarray]
    summary: dict


def simulate(spec: ServeSpec, requests: Requests, early_stop: bool = False) -> Result:
    """Serve ``requests`` under ``spec``: the engine run, its per-request rows and summary.

    ``early_stop``: end the run as soon as more than 1% of the requests (plus one) got their first token past the
    TTFT SLO: its p99 TTFT then misses the SLO whatever the rest do (a search point needs no more). The summary of
    a stopped run covers the requests that got that far (``stopped_early``; its percentiles are lower bounds)."""
    pricer = StepPricer(spec.model, spec.gpu, spec.tp, spec.strategy)
    late = (spec.slo.ttft_s, int(np.ceil(0.01 * len(requests))) + 1) if early_stop else None
    engine = Engine(requests, pricer, spec.engine, late).run()
    rows = metrics.request_rows(engine, spec.slo)
    return Result(spec, requests, engine, rows, metrics.summary(engine, spec.slo, rows))


def document(result: Result) -> dict:
    """The run as one JSON-able object: the spec, the workload, the summary (what ``--format json`` prints)."""
    return {**result.spec.describe(), "workload": result.requests.describe(), **result.summary}


def write(path, results: Result | list[Result]):
    """Every run's per-request rows as Parquet (kind ``serving``, an ``on_full`` column first: schema 2), the
    first run's description, summary and thinned timeline in the header, and ``runs``: every run's document."""
    from tiersim import fileformat

    return fileformat.write_table(path, *frame_and_meta(results))


def frame_and_meta(results: Result | list[Result]):
    """:func:`write`'s table and header (``serve --report`` draws them without writing a file)."""
    import pandas as pd

    from tiersim import fileformat

    results = [results] if isinstance(results, Result) else list(results)
    first = results[0]
    frame = pd.concat([pd.DataFrame({"on_full": r.spec.engine.on_full, **{k: r.rows[k] for k in metrics.REQUEST_COLUMNS}})
                       for r in results], ignore_index=True)
    meta = {**fileformat.header(fileformat.SERVING), **document(first),
            "timeline": metrics.thin(metrics.timeline(first.engine)),
            "kv_block_tokens": memory.BLOCK_TOKENS, "hbm_blocks": first.engine.budget.blocks, "runs": [document(r) for r in results]}
    return frame, meta
