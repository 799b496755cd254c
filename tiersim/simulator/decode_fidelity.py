"""Decode steps of real engines, measured by others, against the simulator: decode error by source and role.

``fidelity`` checks the physics against per-operator tables (vidur's), the same kind of data it was fitted on.
A real engine's step adds what those tables leave out: the LM head, sampling, the engine's per-step host work,
its own attention kernel. ``tiersim/data/public-decode-steps.json`` holds such measurements, each source with its
role (``held_out``: nothing fitted on it; ``fit``: an engine preset's constants were, :func:`fit_attention_block_bw`
and :func:`fit_kv_reread_share`; ``check``: a fit source's points the fit did not read),
of two kinds: *whole runs* (B prompts of L tokens, L output tokens each, the batch's
end-to-end latency), priced as the engine ran them: one batched prefill (``prefill`` physics), then the L - 1
further decode steps; and *token-to-token latencies* (the mean decode step after the first token of a batch of B
requests of I input and O output tokens), priced as the mean of those O - 1 steps. Each decode step holds the
whole KV in HBM (``prefill.mixed_step_s`` with no prefill rows: what ``analytic.layer_costs`` charges) and pays
the ``--engine-overhead`` preset its source names for that GPU (:func:`engine_for`). A point is classified before it
is compared (:func:`regime`): runs whose KV outgrows HBM (the engine preempts and recomputes, or admits fewer
requests at a time), runs dominated by their prefill, measurements faster than the weights can be read (a failed
run), and runs an engine ran on another attention kernel than its preset prices (a sliding-window model under vLLM
0.5-0.6) are reported apart, never silently dropped. A run whose KV outgrows HBM is not priced by one batch
holding it all: given ``serve`` (the serving layer's replay, ``tiersim.serving.replay``: this layer cannot import
it), :func:`points` prices it as the engine served it, B requests at t = 0 under the source's ``on_full`` policy,
regime :data:`SERVED`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

import numpy as np

from tiersim.shapes import ModelShape, block_layout
from tiersim.simulator import engines, prefill
from tiersim.simulator.presets import GB, GPU, Model, get_gpu

DATA = "public-decode-steps.json"
#: Share of HBM an engine gives its weights and KV cache (vLLM's and TensorRT-LLM's default 0.9), less a
#: workspace for activations: a batch whose KV at its last step needs more is preempted, not decoded.
HBM_UTILIZATION = 0.9
WORKSPACE_BYTES = 1.0 * GB
#: A run whose simulated prefill is more than this share of its simulated time is a prefill measurement.
PREFILL_HEAVY = 0.10
#: Batches up to this size are the small-batch regime (the issue's <= 10% worst target).
SMALL_BATCH = 8
#: The regime of a whole run over HBM priced by ``serve`` (the engine's own answer: waves or preemptions).
SERVED = "decode run, KV over HBM (served)"
PREEMPTED = "preempted (KV over HBM)"


@cache
def load() -> dict:
    return json.loads(resources.files("tiersim").joinpath("data", DATA).read_text())


def gpu_for(doc: dict, key: str) -> GPU:
    """The preset a source's GPU is read as (the data file names it and says why)."""
    return get_gpu(doc["gpus"][key]["preset"])


def engine_for(doc: dict, source: str, gpu: str) -> str:
    """The engine preset ``source``'s runs on GPU key ``gpu`` are priced with: the source's
    ``engine_overhead_by_gpu[gpu]`` where it names one, else its ``engine_overhead``. The one reading: points,
    residuals, the fits' subsets and the benchmark tables all ask here.

    Why per GPU: one source's runs on two machines need not come from one engine release (Argonne's A100 vLLM runs
    are from a vLLM 0.6 tree, its H100 runs from an unpinned install: the data file cites both), and a release's
    host line is the engine's, not the source's. A name no preset has, or a GPU key the file does not define, is an
    error in the data file, said as such (not --engine-overhead's message)."""
    src = doc["sources"][source]
    by_gpu = src.get("engine_overhead_by_gpu", {})
    stray = sorted(set(by_gpu) - set(doc["gpus"]))
    if stray:
        raise ValueError(f"{DATA}: source {source} names an engine for GPU {', '.join(stray)}, which the file's "
                         f"gpus do not define")
    name = by_gpu.get(gpu, src["engine_overhead"])
    if name not in engines.names():
        raise ValueError(f"{DATA}: source {source} prices GPU {gpu} with engine {name!r}, not a preset of "
                         f"{engines.DATA} ({', '.join(engines.names())})")
    return name


def model_for(doc: dict, key: str) -> Model:
    """The model of one of the file's published shapes, its block layout read from its ``architecture`` by
    ``shapes.block_layout`` (the one reading: GPT-J's parallel block, its plain MLP)."""
    s = doc["models"][key]
    layout = block_layout(s["architecture"], s)
    if "gated_mlp" in s and bool(s["gated_mlp"]) != layout["gated_mlp"]:
        raise ValueError(f"{key}: gated_mlp {s['gated_mlp']} is not a {s['architecture']} block's")
    return Model.from_shape(ModelShape(key, s["architecture"], s["num_layers"], s["hidden_size"],
                                       s["intermediate_size"], s["num_attention_heads"], s["num_kv_heads"],
                                       s["head_dim"], s["vocab_size"], **layout,
                                       dtype_bytes=s.get("dtype_bytes", 2), kv_dtype_bytes=s.get("kv_dtype_bytes", 2)))


def prefill_batch_s(model: Model, gpu: GPU, batch: int, length: int) -> float:
    """``batch`` prompts of ``length`` tokens prefilled in one forward (``prefill.prefill_s`` with ``sequences``):
    GEMMs and small ops over every row, causal attention per prompt in one kernel call, the LM head for the batch's
    last rows and one step's host work."""
    return float(prefill.prefill_s(model, gpu, length, sequences=batch))


def decode_steps_s(model: Model, gpu: GPU, batch: int, context: int, steps: int) -> np.ndarray:
    """``steps`` decode steps after a prompt of ``context`` tokens (the first output token comes with the
    prefill, then one per step), each at its own context, the whole KV in HBM."""
    contexts = np.arange(context, context + steps, dtype=float)
    kv = batch * contexts * model.kv_bytes_per_token_layer
    step = np.asarray(prefill.mixed_step_s(model, gpu, batch, kv, 0), dtype=float)
    return np.maximum(step, gpu.step_host_floor)


@dataclass
class RunPoint:
    source: str
    role: str
    engine: str
    gpu: str
    model: str
    batch: int
    length: int  # the prompt's tokens (a whole run's output is as long)
    reference_ms: float  # per output token: a whole run's latency / L, or the token-to-token latency
    simulated_ms: float
    prefill_share: float  # of the simulated run (0: a token-to-token latency has no prefill in it)
    regime: str

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.simulated_ms / self.reference_ms - 1.0)


#: The regime of a point its engine ran on another decode-attention kernel than its preset prices
#: (:func:`other_kernel`).
OTHER_KERNEL = "other attention kernel (sliding window)"


def other_kernel(doc: dict, source: str, model: str) -> bool:
    """Whether ``source``'s engine ran ``model`` on another attention kernel than the one its preset prices: the
    source names the kernel its engine falls back to for a sliding-window config (``sliding_window_kernel``) and the
    model's config has a window (``sliding_window``, as that engine reads it), whether or not the window binds.

    Why a rule on the config and not on the error: vLLM 0.5 (and the releases around it) picks its FlashAttention
    backend unless the model has a sliding window, and then its XFormers backend, whose decode attention is vLLM's
    own PagedAttention kernel (one thread block per query head, not GQA-aware; unsplit above 512 sequence x head
    blocks): the data file cites the selector. ``vllm-sync`` prices FlashAttention's decode (the fit sources'
    GQA-aware split-KV kernels) and no fit source measures the PagedAttention kernel, so such a run is reported
    apart, at every batch and on every GPU, not priced with a kernel it did not run."""
    return bool(doc["sources"][source].get("sliding_window_kernel") and doc["models"][model].get("sliding_window"))


def regime(model: Model, gpu: GPU, batch: int, tokens: int, per_token_s: float, prefill_share: float,
           preempts: bool = True, kernel_apart: bool = False) -> str:
    """Which regime a point measures: ``decode small batch`` / ``decode large batch``, or why it is apart.

    * :data:`OTHER_KERNEL` (``kernel_apart``, :func:`other_kernel`): the engine ran another decode-attention kernel
      than the preset prices; first, as nothing below is priced right for it.
    * ``preempted`` (:data:`PREEMPTED`): the batch's KV at its last step (``batch x tokens``) exceeds what HBM
      holds after the weights (:data:`HBM_UTILIZATION`, :data:`WORKSPACE_BYTES`): the engine recomputes sequences
      or admits fewer at a time, which :func:`points` prices by its ``serve`` replay where given (:data:`SERVED`).
      Only for whole runs (``preempts``): a token-to-token table's static batch that does not fit fails instead,
      and the table has no measurement for it.
    * ``failed run``: faster per output token than reading the weights once at the datasheet bandwidth.
    * ``prefill-heavy``: the simulated prefill is over :data:`PREFILL_HEAVY` of the run.
    """
    if kernel_apart:
        return OTHER_KERNEL
    kv = batch * tokens * model.kv_bytes_per_token
    if preempts and kv > HBM_UTILIZATION * gpu.hbm_bytes - model.weight_bytes - WORKSPACE_BYTES:
        return PREEMPTED
    if per_token_s < model.weight_bytes / gpu.hbm_bw:
        return "failed run (faster than the weights)"
    if prefill_share > PREFILL_HEAVY:
        return "decode run, prefill > 10%"
    return "decode small batch" if batch <= SMALL_BATCH else "decode large batch"


def points(doc: dict | None = None, engine_overrides: dict[str, str] | None = None, gpu_transform=None,
           serve=None) -> list[RunPoint]:
    """Every point of the data file priced with its source's engine preset on its GPU (:func:`engine_for`;
    ``engine_overrides``: source -> another preset, to compare engine lines; ``gpu_transform(gpu) -> gpu``, applied
    after the preset: other physics constants).

    ``serve(model, gpu, batch, length, on_full) -> seconds``: how a whole run whose KV outgrows HBM is priced
    instead (``tiersim.serving.replay.run_s``: B requests of L prompt and L output tokens at t = 0, the source's
    ``on_full`` policy, the same GPU as priced here); its regime is then :data:`SERVED`. Without it such a run
    keeps the all-in-HBM price and the regime :data:`PREEMPTED`: a figure the engine could not have run, reported
    apart."""
    doc = doc or load()
    out = []
    for p in doc["points"]:
        src = doc["sources"][p["source"]]
        if src["role"] not in ("fit", "held_out", "check"):
            raise ValueError(f"{DATA}: source {p['source']} has role {src['role']!r}, not fit/held_out/check")
        name = (engine_overrides or {}).get(p["source"]) or engine_for(doc, p["source"], p["gpu"])
        model = model_for(doc, p["model"])
        gpu = engines.apply(gpu_for(doc, p["gpu"]), name, model.num_layers)
        gpu = gpu_transform(gpu) if gpu_transform else gpu
        b = p["batch"]
        if "t2t_ms" in p:  # token-to-token latency: the mean decode step after the first token
            n, steps = p["input"], p["output"] - 1
            ref, pre = p["t2t_ms"] * 1e-3, 0.0
            sim = float(decode_steps_s(model, gpu, b, n, steps).mean())
            share, tokens, preempts = 0.0, n + p["output"], False
        else:  # a whole run: its latency over its L output tokens
            n = p["length"]
            ref, pre = p["latency_s"] / n, prefill_batch_s(model, gpu, b, n)
            run = pre + float(decode_steps_s(model, gpu, b, n, n - 1).sum())
            sim, share, tokens, preempts = run / n, pre / run, 2 * n, True
        kind = regime(model, gpu, b, tokens, ref, share, preempts, other_kernel(doc, p["source"], p["model"]))
        if kind == PREEMPTED and serve is not None:
            if src.get("on_full") is None:
                raise ValueError(f"{DATA}: source {p['source']} has whole runs over HBM but no on_full policy "
                                 f"(what its engine does when the KV does not fit)")
            # the prefill share stays the all-in-HBM run's: it classifies nothing here
            sim, kind = serve(model, gpu, b, n, src["on_full"]) / n, SERVED
        out.append(RunPoint(p["source"], src["role"], name, p["gpu"], p["model"], b, n, 1e3 * ref, 1e3 * sim,
                            share, kind))
    return out


#: Saturation points tried by :func:`fit_attention_block_bw`: blocks at which the per-block rate reaches the HBM share.
BLOCK_GRID = tuple(range(8, 257, 8))
#: GQA re-read shares tried by :func:`fit_kv_reread_share`: 0 to 1 in steps of 0.01 (the data file's precision).
SHARE_GRID = tuple(i / 100 for i in range(101))


def _fit_subset(doc: dict, engine: str) -> tuple[set[str], dict]:
    """The **fit** sources priced with ``engine`` (by source role) and the data file cut down to their points that
    are (:func:`engine_for`, per GPU): held-out and check sources are never handed to a fit, nor a fit source's runs
    on a GPU it prices with another engine."""
    mine = [p for p in doc["points"]
            if doc["sources"][p["source"]]["role"] == "fit" and engine_for(doc, p["source"], p["gpu"]) == engine]
    return {p["source"] for p in mine}, {**doc, "points": mine}


def _on_presets(doc: dict, sub: dict, presets) -> dict:
    """``sub`` cut down to the points whose GPU is read as one of ``presets``."""
    return {**sub, "points": [p for p in sub["points"] if doc["gpus"][p["gpu"]]["preset"] in presets]}


def _sse(pts: list[RunPoint]) -> float:
    """Least squares on relative error over the decode regimes (the others are reported apart, never fitted)."""
    return sum((p.error_pct / 100.0) ** 2 for p in pts if p.regime in DECODE_REGIMES)


def fit_attention_block_bw(engine: str = "trtllm", doc: dict | None = None) -> dict[str, float]:
    """Per GPU preset, the per-block decode-attention rate (bytes/s, ``GPU.attn_block_bw``) of ``engine``'s kernel,
    fitted on the **fit** sources priced with that engine only: least squares on relative error over their decode
    points (small and large batch), the rate written as ``HBM share / saturating blocks`` with the blocks on
    :data:`BLOCK_GRID`. Held-out sources are never read. The points are priced with the engine's shipped GQA
    re-read share (:func:`fit_kv_reread_share`, fitted with the shipped rate: the two fits are a fixed point of
    each other, tested), and no host cost (the preset's is none)."""
    doc = doc or load()
    fit, sub = _fit_subset(doc, engine)
    e = engines.get(engine)
    out = {}
    for preset in sorted({doc["gpus"][p["gpu"]]["preset"] for p in sub["points"]}):
        base = get_gpu(preset)
        share = base.hbm_bw * base.attn_efficiency
        mine = _on_presets(doc, sub, (preset,))
        best = None
        for blocks in BLOCK_GRID:
            rate = share / blocks
            pts = points(mine, gpu_transform=lambda g, r=rate: replace(g, attn_block_bw=r,
                                                                       attn_kv_reread_share=e.reread_share(g)),
                         engine_overrides={k: "none" for k in fit})
            sse = _sse(pts)
            if best is None or sse < best[0]:
                best = (sse, rate)
        out[preset] = best[1]
    return out


def fit_kv_reread_share(engine: str = "trtllm", doc: dict | None = None, pooled: bool = False) -> dict[str, float]:
    """Per GPU preset, the share of a GQA group's repeated KV reads that reach HBM (``GPU.attn_kv_reread_share``)
    in ``engine``'s decode-attention kernel, fitted on the **fit** sources priced with that engine only (by source
    role; held-out and check sources are never read): least squares on relative error over their decode points,
    the share on :data:`SHARE_GRID`, everything else as the engine preset ships (its per-block rate included).

    Why the term: TensorRT-LLM 0.9's decode kernel reads each KV head once per query head of its group, so a GQA
    model (Mistral-7B's 32 query heads over 8 KV heads: 3 repeated reads per byte) re-reads its KV; a re-read
    finds the layer's KV in L2 while it fits (a batch-1 layer's few MB against 40-50 MB) and the part outside L2
    in HBM (``physics.reread_bytes``, ``physics.l2_miss_share``). ``share`` is how much of that outside part the
    re-reads are charged for (fitted, not derived: how much of it still hits L2, e.g. because a group's query heads
    run close together, is not measured by any source here): one figure per GPU, as the L2's policy and the kernel's
    scheduling differ between A100 and H100 (the fit source's own minima are apart, docs/simulator.md). ``pooled``:
    one share for every GPU, least squares over all their points (the alternative that was measured and not
    shipped: docs/simulator.md)."""
    doc = doc or load()
    _, sub = _fit_subset(doc, engine)
    presets = sorted({doc["gpus"][p["gpu"]]["preset"] for p in sub["points"]})
    out = {}
    for group in ([presets] if pooled else [[x] for x in presets]):
        mine = _on_presets(doc, sub, group)
        best = None
        for share in SHARE_GRID:
            sse = _sse(points(mine, gpu_transform=lambda g, s=share: replace(g, attn_kv_reread_share=s)))
            if best is None or sse < best[0]:
                best = (sse, share)
        out.update({preset: best[1] for preset in group})
    return out


#: The regimes a decode figure is read from (the others are reported apart: preempted, prefill-heavy, failed).
DECODE_REGIMES = ("decode small batch", "decode large batch")


def error_rows(doc: dict | None = None, serve=None) -> list[dict]:
    """``fidelity.error_rows``' shape: one row per run (source, role, regime, reference/simulated ms, error);
    ``serve`` as :func:`points` takes it."""
    return [{"source": p.source, "role": p.role, "regime": p.regime, "reference_ms": p.reference_ms,
             "simulated_ms": p.simulated_ms, "error_pct": p.error_pct} for p in points(doc, serve=serve)]


def summary(pts: list[RunPoint]) -> dict[tuple, dict]:
    """Per (source, regime): points, median and worst |error| (%), GPUs and models covered."""
    groups: dict[tuple, list[RunPoint]] = {}
    for p in pts:
        groups.setdefault((p.source, p.regime), []).append(p)
    return {k: {"points": len(v), "median_pct": statistics.median(abs(p.error_pct) for p in v),
                "worst_pct": max(abs(p.error_pct) for p in v), "gpus": sorted({p.gpu for p in v}),
                "models": sorted({p.model for p in v})} for k, v in sorted(groups.items())}


# -- diagnosis, never fitted: what a source's runs leave over the device time, by batch and context ----------------
#: Contexts up to this many tokens are a residual line's points: attention is a small share of their step, so what
#: is left over the device time is mostly the engine's per-step work, not its attention kernel.
SHORT_CONTEXT = 256


@dataclass
class Residual:
    source: str
    role: str
    gpu: str
    model: str
    batch: int
    length: int
    residual_ms: float  # measured less the same point simulated without its engine's per-step line, per output token
    charged_ms: float  # the per-step line the source's preset charges at this batch


def residuals(source: str, doc: dict | None = None) -> list[Residual]:
    """Per decode-regime point of ``source``: the measured time per output token less the simulated one with the
    source's engine preset minus its per-step host line (its attention kernel kept), beside the line it charges.

    Each output token of a priced run carries one step's host line exactly (a whole run: the prefill's and the
    L - 1 decode steps' over L tokens; a token-to-token latency: one decode step's), so where the simulated device
    time is right the residual *is* the engine's per-step cost at that batch. A diagnosis, read to explain a source's
    error (is it the per-sequence term or the attention kernel?), never to set a constant: no preset reads it, and a
    held-out source stays held out."""
    doc = doc or load()
    sub = {**doc, "points": [p for p in doc["points"] if p["source"] == source]}
    bare = points(sub, gpu_transform=lambda g: replace(g, step_overhead=0.0, step_overhead_per_sequence=0.0,
                                                        step_host_floor=0.0))
    # the points the published errors count: classified as priced with the preset (its line moves the prefill share);
    # each beside the line of the preset its GPU's runs are priced with (engine_for)
    return [Residual(p.source, p.role, p.gpu, p.model, p.batch, p.length, p.reference_ms - p.simulated_ms,
                     1e3 * engines.get(shipped.engine).host_s(p.batch)) for p, shipped in zip(bare, points(sub))
            if shipped.regime in DECODE_REGIMES]


def residual_line(rows: list[Residual], max_length: int = SHORT_CONTEXT) -> dict[str, tuple[float, float]]:
    """Per GPU key of ``rows``, ``(fixed_ms, per_sequence_ms)``: least squares of the residual on the batch over the
    points at contexts up to ``max_length`` (a GPU with one batch size there has no line). The engine's per-step line
    as the runs show it, to hold against the preset's: diagnosis only (see :func:`residuals`)."""
    out = {}
    for gpu in sorted({r.gpu for r in rows}):
        sel = [r for r in rows if r.gpu == gpu and r.length <= max_length]
        if len({r.batch for r in sel}) < 2:
            continue
        a = np.column_stack([np.ones(len(sel)), [float(r.batch) for r in sel]])
        fixed, per_sequence = np.linalg.lstsq(a, np.array([r.residual_ms for r in sel]), rcond=None)[0]
        out[gpu] = (float(fixed), float(per_sequence))
    return out


@dataclass
class PairedExcess:
    """One configuration two models of a source were both run at: how much more the first took than the second,
    measured against simulated."""

    source: str
    gpu: str
    batch: int
    length: int
    measured_diff_ms: float  # model's time per output token less the other model's, measured
    simulated_diff_ms: float  # the same difference as the simulator prices it

    @property
    def excess_ms(self) -> float:
        """What the first model costs per output token beyond what the simulator says it should over the second."""
        return self.measured_diff_ms - self.simulated_diff_ms


def paired_excess(source: str, model: str, against: str, doc: dict | None = None) -> list[PairedExcess]:
    """Per (GPU, batch, length) where ``source`` ran both ``model`` and ``against`` and both points are in a decode
    regime: the measured difference of their time per output token beside the simulated one.

    Why pair: the two runs share the machine, the engine, its version and its harness, so whatever those add
    cancels and what is left is what the simulator misses about ``model``'s shape relative to ``against``'s. A pair
    that differs in one thing isolates it (Llama-3-8B and Mistral-7B have the same layers and differ in the
    vocabulary: the excess bounds a per-sequence cost over the vocabulary, such as sampling). A diagnosis like
    :func:`residuals`: no constant reads it, and a held-out source stays held out."""
    doc = doc or load()
    sub = {**doc, "points": [p for p in doc["points"] if p["source"] == source and p["model"] in (model, against)]}
    by_key: dict[tuple, dict[str, RunPoint]] = {}
    for p in points(sub):
        if p.regime in DECODE_REGIMES:
            by_key.setdefault((p.gpu, p.batch, p.length), {})[p.model] = p
    return [PairedExcess(source, gpu, batch, length, pair[model].reference_ms - pair[against].reference_ms,
                         pair[model].simulated_ms - pair[against].simulated_ms)
            for (gpu, batch, length), pair in sorted(by_key.items()) if model in pair and against in pair]
