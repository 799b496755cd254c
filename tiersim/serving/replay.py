"""Public whole-run decode measurements whose KV outgrows HBM, priced as the engine served them.

``simulator.decode_fidelity`` prices a whole run (B prompts of L tokens, L output tokens each, the batch's latency)
as one batched prefill and L - 1 decode steps with every sequence's KV in HBM. Where B x 2L tokens of KV do not fit,
no engine ran it that way: vLLM 0.5 preempts the latest request and recomputes it later, TensorRT-LLM's Executor
admits a request only once its whole KV can be reserved (waves). That is a request-level question, so these runs
are replayed here, one layer above the simulator: B requests arriving at t = 0, input and output L, the source's
``on_full`` policy (the data file says which, and why), the GPU exactly as ``decode_fidelity`` prices it (engine
preset and any transform applied), the serving engine's defaults for the rest (its KV budget: HBM less the weights,
the step workspace and the preset's reserve; FCFS; 256 sequences; 2,048 tokens per iteration). The run's latency is
the replay's makespan. Nothing is fitted on these runs: they stay held out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np

from tiersim.serving.engine import TIMELINE_COLUMNS, EngineConfig
from tiersim.serving.run import ServeSpec, simulate
from tiersim.serving.workload import Requests
from tiersim.simulator import decode_fidelity
from tiersim.simulator.presets import GPU, Model


@dataclass(frozen=True)
class Replay:
    """One whole run served: its makespan (s), the preemptions, the most requests running at once, the KV budget."""

    seconds: float
    preemptions: int
    peak_batch: int
    kv_gb: float


@cache  # deterministic on frozen inputs; points() and the bench's per-run table ask for the same runs
def replay(model: Model, gpu: GPU, batch: int, length: int, on_full: str,
           config: EngineConfig | None = None) -> Replay:
    """``batch`` requests of ``length`` prompt and ``length`` output tokens, all at t = 0, served on one ``gpu``
    under ``on_full`` (``config``: other engine settings; the serving defaults otherwise). ``max_tokens`` is the
    output: what the request asked for (the harnesses set max_new_tokens = L and ignore EOS), so a reserving policy
    reserves exactly what the request will use."""
    config = replace(config or EngineConfig(), on_full=on_full, max_tokens=length)
    requests = Requests(np.zeros(batch), np.full(batch, length, dtype=np.int64), np.full(batch, length, dtype=np.int64),
                        f"{batch} x {length}/{length} at t = 0")
    result = simulate(ServeSpec(model, gpu, 1, engine=config), requests)
    column = TIMELINE_COLUMNS.index("batch")  # the decode rows of each iteration
    peak = max((int(row[column]) for row in result.engine.timeline), default=0)
    return Replay(float(result.summary["makespan_s"]), int(result.summary["preemptions"]), peak,
                  float(result.summary["kv_budget_gb_per_gpu"]))


def run_s(model: Model, gpu: GPU, batch: int, length: int, on_full: str) -> float:
    """The ``serve`` hook of :func:`decode_fidelity.points`: the served run's latency in seconds."""
    return replay(model, gpu, batch, length, on_full).seconds


def points(doc: dict | None = None, **kwargs) -> list[decode_fidelity.RunPoint]:
    """:func:`decode_fidelity.points` with every whole run over HBM served (regime ``decode_fidelity.SERVED``)."""
    return decode_fidelity.points(doc, serve=run_s, **kwargs)


def error_rows(doc: dict | None = None) -> list[dict]:
    """:func:`decode_fidelity.error_rows` with the runs over HBM served (what ``fidelity.error_rows`` is handed)."""
    return decode_fidelity.error_rows(doc, serve=run_s)
