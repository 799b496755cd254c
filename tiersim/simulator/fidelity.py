"""Simulated against public per-operator GPU profiles: the fit of the roofline physics and its check.

The reference (``tiersim/data/public-decode-profiles.json``) holds per-layer decode operator times
from vidur's public profiles (sources in the file and in docs/simulator.md): on A100 and H100, the
GEMMs and small ops of five models at 1-64 tokens, and on A100 decode attention by batch x context
for two of them. A step is ``layers x (GEMMs + small ops + attention + KV append)``, as vidur itself
adds them; the LM head and the embedding are not in the public tables, so both sides leave them out.

``FIT`` names the cases the preset constants were fitted on (one small and one large model per
GPU: that separates the per-kernel cost from the bandwidth term); every other case is held out and
is what the reported error means. ``fit`` re-derives the constants from the fit cases by linear
least squares on relative error; ``compare`` prices every point with the presets as shipped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from importlib import resources

import numpy as np

from tiersim.shapes import block_layout
from tiersim.simulator import physics
from tiersim.simulator.presets import GPU, Model, get_gpu

REFERENCE = "public-decode-profiles.json"
#: (gpu, model) cases the preset constants were fitted on; all others are held out.
FIT = {("a100", "Meta-Llama-3-8B"), ("a100", "CodeLlama-34b"), ("h100", "Llama-2-7b"), ("h100", "CodeLlama-34b")}
PRESET = {"a100": "a100-80g", "h100": "h100-sxm"}


def load_reference() -> dict:
    return json.loads(resources.files("tiersim").joinpath("data", REFERENCE).read_text())


def model_for(case: dict) -> Model:
    """A model preset with the case's exact layer shape (weights from the shape; embeddings untied unless the case
    says ``tie_word_embeddings``, as the prefill reference's tied models do) and block layout (its ``architecture``,
    read by ``shapes.block_layout``: vidur profiles phi-2 as the parallel block it is, its GPTBlock without a
    post-attention norm, vidur/profiling/mlp/mlp_impl.py). The one builder of both reference files' published shapes."""
    h, heads, kv = case["hidden_size"], case["num_attention_heads"], case["num_kv_heads"]
    hd, ff = h // heads, case["intermediate_size"]
    attn = h * hd * (heads + 2 * kv) + heads * hd * h
    gated = bool(case["gated_mlp"])
    tied = bool(case.get("tie_word_embeddings", False))
    mlp = (3 if gated else 2) * h * ff
    params = case["num_layers"] * (attn + mlp) + (1 if tied else 2) * case["vocab_size"] * h + h  # + the final norm
    layout = block_layout(case.get("architecture", ""), case)
    return Model(case["model"], case["num_layers"], kv, hd, h, heads, float(params),
                 vocab_size=case["vocab_size"], intermediate_size=ff, gated_mlp=gated, tie_word_embeddings=tied,
                 parallel_block=layout["parallel_block"], allreduces_per_layer=layout["allreduces_per_layer"])


@dataclass
class Point:
    gpu: str
    model: str
    batch: int
    context: int  # 0: the case has no attention table (layers without attention)
    reference_ms: float  # per step: layers x the per-layer operators
    simulated_ms: float
    fit: bool

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.simulated_ms / self.reference_ms - 1.0)


def _ops(case: dict) -> dict[int, tuple[float, float]]:
    return {o["tokens"]: (o["gemm_ms"], o["small_ms"]) for o in case["ops"]}


def compare(gpus: dict[str, GPU] | None = None, reference: dict | None = None) -> list[Point]:
    """Every reference point priced by ``physics.layer_s`` (what ``analytic.layer_costs`` charges)."""
    reference = reference or load_reference()
    gpus = gpus or {k: get_gpu(v) for k, v in PRESET.items()}
    points = []
    for case in reference["cases"]:
        gpu, model = gpus[case["gpu"]], model_for(case)
        ops, layers = _ops(case), case["num_layers"]
        fit = (case["gpu"], case["model"]) in FIT
        rows = case.get("attention") or [{"batch": b, "context": 0, "decode_ms": 0.0, "kv_save_ms": 0.0} for b in ops]
        for row in rows:
            b, c = row["batch"], row["context"]
            if b not in ops:
                continue
            gemm, small = ops[b]
            ref = layers * (gemm + small + row["decode_ms"] + row["kv_save_ms"])
            kv = b * c * model.kv_bytes_per_token_layer
            sim = layers * float(physics.layer_s(model, gpu, b, kv, attended=b * c)) * 1e3
            points.append(Point(case["gpu"], case["model"], b, c, ref, sim, fit))
    return points


def summary(points: list[Point]) -> dict:
    """Median and worst |error| (%), separately for the fit and the held-out points."""
    out = {}
    for name, sel in (("fit", [p for p in points if p.fit]), ("held_out", [p for p in points if not p.fit])):
        errors = [abs(p.error_pct) for p in sel]
        out[name] = {"points": len(sel), "median_pct": statistics.median(errors) if errors else None,
                     "worst_pct": max(errors) if errors else None}
    return out


def fit(reference: dict | None = None, cases: set = FIT) -> dict[str, dict[str, float]]:
    """Per GPU, the physics constants least-squares fitted (relative error) on ``cases`` only.

    Weights: ``t = 4 tau + W x (1 + s log2(B) / 6)`` is linear in (tau, x, x s); small ops
    ``a + b (hidden + intermediate)``; attention ``tau_a + bytes y``. Returns GPU field values.
    """
    reference = reference or load_reference()
    out: dict[str, dict[str, float]] = {}
    for gpu_key in sorted({c["gpu"] for c in reference["cases"]}):
        sel = [c for c in reference["cases"] if c["gpu"] == gpu_key and (gpu_key, c["model"]) in cases]
        if not sel:
            continue
        bw = get_gpu(PRESET[gpu_key]).hbm_bw
        rows_w, y_w, rows_s, y_s, rows_a, y_a = [], [], [], [], [], []
        for case in sel:
            model = model_for(case)
            for b, (gemm, small) in _ops(case).items():
                t = gemm * 1e-3
                lg = np.log2(b) / np.log2(physics.SLOWDOWN_TOKENS)
                W = model.layer_weight_bytes
                rows_w.append(np.array([physics.GEMMS_PER_LAYER, W, W * lg]) / t)
                y_w.append(1.0)
                rows_s.append(np.array([1.0, model.hidden_size + model.mlp_width]) / (small * 1e-3))
                y_s.append(1.0)
            for row in case.get("attention") or []:
                t = (row["decode_ms"] + row["kv_save_ms"]) * 1e-3
                kv = row["batch"] * row["context"] * model.kv_bytes_per_token_layer
                rows_a.append(np.array([1.0, kv]) / t)
                y_a.append(1.0)
        tau, x, xs = np.linalg.lstsq(np.array(rows_w), np.array(y_w), rcond=None)[0]
        a, b = np.linalg.lstsq(np.array(rows_s), np.array(y_s), rcond=None)[0]
        fitted = {"weight_efficiency": 1.0 / (x * bw), "gemm_kernel_s": tau, "gemm_batch_slowdown": xs / x,
                  "layer_overhead": a, "layer_overhead_per_width": b}
        if rows_a:
            ta, ya = np.linalg.lstsq(np.array(rows_a), np.array(y_a), rcond=None)[0]
            fitted.update(attn_kernel_s=ta, attn_efficiency=1.0 / (ya * bw))
        out[gpu_key] = {k: float(v) for k, v in fitted.items()}
    return out


# -- decode attention kernels against public H100 kernel benchmarks ---------------------------------------------
ATTENTION_REFERENCE = "public-decode-attention.json"
#: Reads at or below this many KV bytes per call are where the per-call floor dominates (the short regime).
SHORT_READ_BYTES = 64 * 2**20


def load_attention_reference() -> dict:
    return json.loads(resources.files("tiersim").joinpath("data", ATTENTION_REFERENCE).read_text())


@dataclass
class KernelPoint:
    """One public decode-attention kernel time against ``physics.attention_s`` (one layer, one call)."""

    source: str
    role: str  # the source's role in the data file: "fit" or "held_out"
    gpu: str
    layout: str  # q_heads x kv_heads x head_dim
    batch: int
    context: int
    kv_bytes: float
    reference_us: float
    simulated_us: float

    @property
    def fit(self) -> bool:
        return self.role == "fit"

    @property
    def regime(self) -> str:
        return "attention short" if self.kv_bytes <= SHORT_READ_BYTES else "attention long"

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.simulated_us / self.reference_us - 1.0)


def attention_points(gpus: dict[str, GPU] | None = None, reference: dict | None = None) -> list[KernelPoint]:
    """Every public kernel time priced by ``physics.attention_s`` at the case's KV bytes (bf16 K and V)."""
    reference = reference or load_attention_reference()
    gpus = gpus or {k: get_gpu(v) for k, v in PRESET.items()}
    out = []
    for case in reference["cases"]:
        role = reference["sources"][case["source"]]["role"]
        if role not in ("fit", "held_out"):
            raise ValueError(f"{ATTENTION_REFERENCE}: source {case['source']} has role {role!r}, not fit/held_out")
        gpu = gpus[case["gpu"]]
        # K and V in bf16 per token, unless the case states its bytes (MLA reads one latent per token)
        per_token = case.get("kv_bytes_per_token", 2 * case["kv_heads"] * case["head_dim"] * 2)
        layout = f"{case['q_heads']}x{case['kv_heads']}x{case['head_dim']}"
        for p in case["points"]:
            kv = p["batch"] * p["context"] * per_token
            sim = float(physics.attention_s(gpu, kv)) * 1e6
            out.append(KernelPoint(case["source"], role, case["gpu"], layout, p["batch"], p["context"], kv, p["us"], sim))
    return out


def fit_attention_floor(reference: dict | None = None) -> dict[str, float]:
    """Per GPU, the per-call floor ``attn_kernel_s`` least-squares fitted (relative error) on the **fit** sources
    only, the bandwidth term held at the preset's ``attn_efficiency`` (fitted on large reads, where the floor
    does not show): ``min sum ((f + b_i / BW) / t_i - 1)^2`` gives ``f = sum((t_i - b_i / BW) / t_i^2) / sum(1 / t_i^2)``."""
    reference = reference or load_attention_reference()
    out = {}
    for gpu_key in sorted({c["gpu"] for c in reference["cases"]}):
        gpu = get_gpu(PRESET[gpu_key])
        pts = [p for p in attention_points(reference=reference) if p.gpu == gpu_key and p.fit]
        if not pts:
            continue
        t = np.array([p.reference_us for p in pts]) * 1e-6
        b = np.array([p.kv_bytes for p in pts]) / (gpu.hbm_bw * gpu.attn_efficiency)
        out[gpu_key] = float(np.sum((t - b) / t**2) / np.sum(1.0 / t**2))
    return out


# -- engine presets against measured whole steps ------------------------------------------------------------------
#: The validator's own harness run (held out for the hf-eager preset, which is fitted on another run's clean step).
VALIDATOR_RUN = "docs/validation/h100-80gb-hbm3.json"


def engine_rows(path: str | None = None, engine_overhead: str = "hf-eager") -> list[dict]:
    """The validator's measured steps (HF eager harness, H100) simulated with ``engine_overhead``: one row per point
    with the source, role (held out), regime (``in HBM`` or ``offloaded``), measured and simulated ms, error."""
    from pathlib import Path

    from tiersim.simulator import against
    from tiersim.simulator.scenario import assemble

    path = Path(path) if path else Path(__file__).resolve().parents[2] / VALIDATOR_RUN
    if not path.exists():  # an installed package has no docs/: the repository's own run is not there to compare
        return []
    doc, points = against.load_measurements(path)
    model = (doc.get("model_shape") or {}).get("name")
    scenario = assemble(1, model=model, gpu=doc.get("gpu_preset") or "h100-sxm", context=2048,
                        engine_overhead=engine_overhead)
    out = []
    for r in against.compare(scenario, points)["rows"]:
        out.append({"source": "validator-h100", "role": "held_out", "engine": engine_overhead, "model": r["model"],
                    "regime": "in HBM" if r["hbm"] >= 1.0 else "offloaded", "batch": r["batch"],
                    "context": r["context"], "hbm": r["hbm"], "reference_ms": r["measured_ms"],
                    "simulated_ms": r["simulated_ms"], "error_pct": r["error_pct"]})
    return out


def fit_engine_fixed(engine: str, doc: dict | None = None) -> float:
    """An engine's fixed per-step cost (s) fitted on its **fit** TPOT points only: the median of measured TPOT less
    the step simulated with no engine cost, clipped at 0 (an engine faster than the device model adds nothing)."""
    from tiersim.simulator import engines
    from tiersim.simulator.capacity import run
    from tiersim.simulator.scenario import assemble

    doc = doc or engines.load()["measurements"]
    residuals = []
    for p in doc["points"]:
        if p["role"] != "fit" or doc["sources"][p["source"]]["engine"] != engine:
            continue
        sc = assemble(p["concurrency"], model=p["model"], gpu=p["gpu"], context=p["context"], steps=32)
        row, _ = run(sc, sc.policy(1.0, 0.0, 0.0, 0.0), largest=False)
        residuals.append((p["tpot_ms"] - row["step_ms"]) * 1e-3)
    return max(statistics.median(residuals), 0.0) if residuals else 0.0


#: The phases of a stored CPU profile that sit on a synchronous engine's step path (the GPU waits for each).
CPU_PHASES = ("schedule_ms", "sampler_e2e_ms", "prepare_inputs_e2e_ms", "process_model_outputs_ms")


def cpu_profile_line(profile: str = "vidur-a100", doc: dict | None = None, method: str = "endpoints",
                     phases: tuple[str, ...] = CPU_PHASES) -> tuple[float, float]:
    """``(fixed_s, per_sequence_s)`` of one stored CPU-overhead profile (``public-engine-overheads.json``
    ``cpu_profiles``): per batch the sum of the ``phases`` medians (:data:`CPU_PHASES`, all four, a synchronous
    engine's; an engine preset names the ones it waits for under its ``cpu_profile``: vLLM 0.6 overlaps the
    process-model-outputs phase with the next GPU step), then the line through the first and last batch
    (``endpoints``: how the shipped ``vllm-sync`` / ``--host-overhead sync`` and ``vllm-0.6`` lines were drawn) or
    least squares over every batch (``least_squares``: the sums are not quite linear, so the two differ). Reads that
    profile's rows only: no engine measurement, fit or held out."""
    from tiersim.simulator import engines

    doc = doc or engines.load()
    unknown = sorted(set(phases) - set(CPU_PHASES))
    if unknown or not phases:
        raise ValueError(f"CPU profile phases must be some of {', '.join(CPU_PHASES)}, got {list(phases)}")
    rows = sorted(doc["cpu_profiles"][profile]["rows"], key=lambda r: r["batch"])
    batch = np.array([float(r["batch"]) for r in rows])
    total = np.array([sum(r[k] for k in phases) for r in rows]) * 1e-3
    if method == "endpoints":
        per_sequence = (total[-1] - total[0]) / (batch[-1] - batch[0])
        return float(total[0] - per_sequence * batch[0]), float(per_sequence)
    if method == "least_squares":
        per_sequence, fixed = np.polyfit(batch, total, 1)
        return float(fixed), float(per_sequence)
    raise ValueError(f"method must be endpoints or least_squares, got {method!r}")


def engine_tpot_rows() -> list[dict]:
    """Public TPOT measurements of real engines (``public-engine-overheads.json`` ``measurements``) simulated with
    the engine's own preset (a lockstep batch at the run's mean decode context, all KV in HBM)."""
    from tiersim.simulator import engines
    from tiersim.simulator.capacity import run
    from tiersim.simulator.scenario import assemble

    doc = engines.load()["measurements"]
    out = []
    for p in doc["points"]:
        src = doc["sources"][p["source"]]
        sc = assemble(p["concurrency"], model=p["model"], gpu=p["gpu"], context=p["context"], steps=32,
                      engine_overhead=src["engine"])
        row, _ = run(sc, sc.policy(1.0, 0.0, 0.0, 0.0), largest=False)
        out.append({"source": p["source"], "role": p["role"], "engine": src["engine"], "model": p["model"],
                    "regime": "small batch" if p["concurrency"] <= 8 else "large batch", "batch": p["concurrency"],
                    "context": p["context"], "reference_ms": p["tpot_ms"], "simulated_ms": row["step_ms"],
                    "error_pct": 100.0 * (row["step_ms"] / p["tpot_ms"] - 1.0)})
    return out


# -- every source in one table: error per source, role and regime -------------------------------------------------
def error_rows(decode_rows: list[dict] | None = None) -> list[dict]:
    """One row per reference point of every source (decode steps, attention kernels, prefill, engines, the
    validator's offloaded steps, real engines' whole decode runs): ``source, role, regime, reference_ms,
    simulated_ms, error_pct``. Roles come from the data files (``fit``, ``held_out``, ``check``: a fit source's
    points its fit did not read). ``decode_rows``: the real engines' rows to use (``serving.replay.error_rows()``,
    runs over HBM served; this layer cannot import it); by default ``decode_fidelity.error_rows()``, where those
    runs stay unserved."""
    from tiersim.simulator import decode_fidelity, prefill_fidelity

    rows = [{"source": "vidur-decode", "role": "fit" if p.fit else "held_out",
             "regime": "decode small batch" if p.batch <= 8 else "decode large batch", "reference_ms": p.reference_ms,
             "simulated_ms": p.simulated_ms, "error_pct": p.error_pct} for p in compare()]
    rows += [{"source": p.source, "role": p.role, "regime": p.regime, "reference_ms": p.reference_us * 1e-3,
              "simulated_ms": p.simulated_us * 1e-3, "error_pct": p.error_pct} for p in attention_points()]
    for r in prefill_fidelity.error_rows():
        regime = {"ttft": "prefill (TTFT)", "attention": "prefill attention"}.get(r["regime"])
        regime = regime or ("GEMMs 128-512 rows" if r["tokens"] <= 512 else "GEMMs prefill chunks")
        rows.append({"source": r["source"], "role": r["role"], "regime": regime, "reference_ms": r["reference_ms"],
                     "simulated_ms": r["simulated_ms"], "error_pct": r["error_pct"]})
    rows += [{**{k: r[k] for k in ("source", "role", "reference_ms", "simulated_ms", "error_pct")},
              "regime": f"engine TPOT, batch {r['batch']}"} for r in engine_tpot_rows()]
    rows += [{**{k: r[k] for k in ("source", "role", "reference_ms", "simulated_ms", "error_pct")},
              "regime": "offload (KV over PCIe)" if r["regime"] == "offloaded" else "eager harness, KV in HBM"}
             for r in engine_rows()]
    rows += decode_fidelity.error_rows() if decode_rows is None else decode_rows
    return rows


def source_summary(rows: list[dict]) -> list[dict]:
    """Per (source, role, regime): points, median and worst |error| and the median signed error (%)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["role"], r["regime"]), []).append(r["error_pct"])
    return [{"source": s, "role": role, "regime": regime, "points": len(e),
             "median_pct": statistics.median(abs(x) for x in e), "worst_pct": max(abs(x) for x in e),
             "median_signed_pct": statistics.median(e)} for (s, role, regime), e in sorted(groups.items())]
