"""The prefill physics against public measurements: the fit of its constants and the held-out check, by source.

The reference (``tiersim/data/public-prefill-profiles.json``) holds, per source (each described in the file and in
docs/simulator.md, "Prefill"):

* ``vidur-ops`` (fit): vidur's per-layer GEMM and small-op times at 128-4096 tokens, TP 1, A100 and H100 (its
  TP 2/4/8 rows of two models, ``vidur-ops-tp``, check :func:`parallel.shard` and are not fitted on);
* ``fa3-h100`` (fit): FlashAttention-3's forward rate on an H100 at 512-16K tokens;
* ``splitwise`` (held out): the prompt phase of one request (batch 1, 128-8192 tokens) of Llama-2-70B at TP 2/4/8
  and BLOOM-176B at TP 8 on DGX-A100 and DGX-H100, end to end in the Splitwise authors' engine;
* ``trtllm-v0.5-a100`` (held out): TensorRT-LLM v0.5's published batch-1 first-token latency on A100 (FP16), four
  models at 128 and 2048 tokens, TP 1/4/8;
* ``trtllm-v0.9-a100`` (held out): the same page for TensorRT-LLM 0.9.0, its rows at TP > 1 (Llama-2-70B at TP 4 and 8,
  Falcon-180B at TP 8; its TP 1 rows are the DLI check's own rows): Falcon priced with the one all-reduce per layer
  its shape's parallel block is run with (``Model.allreduces_per_layer``; v0.5's case states its own two);
* ``argonne-vllm``, ``argonne-trtllm``, ``argonne-dsmii`` (held out): LLM-Inference-Bench's TTFT of 16 prompts x
  1024 tokens on one A100, H100 or GH200 (fp16), three 7-8B models, per engine;
* ``distserve-swift``, ``distserve-vllm`` (held out): DistServe's fitted prefill lines (its C++ engine, and vLLM as its
  authors profiled it) for OPT-13B/66B on A100 at TP 1-8, evaluated at 128-2048 tokens;
* ``distserve-vllm-trace``, ``distserve-swift-trace`` (held out): the same authors' served traces (OPT-13B on
  A100-80GB; vLLM at TP 1, their engine's prefill instance at TP 2), only the requests that had the prefill GPUs to
  themselves: second sources of the engines the two profile lines measure (``<trace>+line``, check: each re-priced
  with a line fitted on its engine's profile only, :func:`fit_engine_line`);
* ``tiersim-h100-operators`` (held out): this project's own H100 GEMM run at 128-512 tokens;
* ``nvidia-dli-trtllm-ttft`` (check): the first-token latencies of the TensorRT-LLM 0.9.0 table whose token-to-token
  latencies fit the trtllm engine's decode block rate (``tiersim/data/public-decode-steps.json``, read from there):
  one static batch of 1-896 prompts of 128 or 2048 tokens, A100-80GB and H100, four models. No prefill constant is
  fitted on it; it is a check, not held out, since each fitted token-to-token latency was derived from this column.

``FIT_SOURCES`` are the only ones :func:`fit` reads; every row of another source is held out (or a check, so
named) and is what the reported error means. :func:`rows` prices every point with the presets as shipped;
:func:`summary` gives the median and worst |error| per source (the fidelity benchmark calls :func:`error_rows`).
One more set of rows, ``splitwise+engine-step`` (check), adds to each Splitwise point that engine's own per-step
excess (its batch-1 decode step minus the simulated one): not a fit (nothing is changed by it), the decomposition of
that source's miss. :func:`fit_dli_line` / :func:`line_rows`: a trtllm prefill line fitted on the DLI check and
re-checked on the held-out TensorRT-LLM TTFTs, the reason no preset carries one. :func:`fit_engine_line` /
:func:`engine_line_rows`: a per-forward vLLM engine line fitted on ``distserve-vllm`` and checked on
``distserve-vllm-trace`` (the same engine), not shipped.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np

from tiersim.simulator import decode_fidelity, engines, fidelity, parallel, physics, prefill
from tiersim.simulator.presets import GPU, SEQUENTIAL_ALLREDUCES, Model, get_gpu, get_model

REFERENCE = "public-prefill-profiles.json"
FIT_SOURCES = frozenset({"vidur-ops", "fa3-h100"})
PRESET = fidelity.PRESET  # {"a100": "a100-80g", "h100": "h100-sxm"}
#: Every GPU key of the reference: the fitted two, the 40 GB A100 (LLM-Inference-Bench's Polaris A100s; the 80 GB
#: part's constants) and the GH200 (whose prefill constants are the H100's: an assumption its TTFT rows test).
TTFT_PRESET = {**PRESET, "a100-40gb": "a100-40g", "gh200": "gh200"}
#: Decode context (tokens) at which the engine-step check prices the simulated batch-1 decode step.
ENGINE_STEP_CONTEXT = 1024
#: The decode-steps source whose first-token latencies are priced here, its rows' name, and its GPU keys -> this
#: reference's GPU keys (the same presets).
DLI_SOURCE = "nvidia-dli-trtllm"
DLI_TTFT = "nvidia-dli-trtllm-ttft"
DLI_GPUS = {"a100-80gb": "a100", "h100-80gb-hbm3": "h100"}


def load_reference() -> dict:
    return json.loads(resources.files("tiersim").joinpath("data", REFERENCE).read_text())


@dataclass
class Row:
    source: str
    regime: str  # "gemm" (per layer), "attention" (kernel), "ttft" (one request's prefill)
    gpu: str
    model: str
    tp: int
    tokens: int  # per sequence
    reference_ms: float
    simulated_ms: float
    role: str  # "fit", "held_out", or "check" (points no fit read and no held-out figure counts: vidur's TP > 1
    #            shards, the Splitwise engine-step decomposition)
    sequences: int = 1  # equal prompts prefilled together (a batch's TTFT)
    allreduces_per_layer: int = SEQUENTIAL_ALLREDUCES  # as the source's engine ran the model (TTFT cases)

    @property
    def fit(self) -> bool:
        return self.role == "fit"

    @property
    def error_pct(self) -> float:
        return 100.0 * (self.simulated_ms / self.reference_ms - 1.0)

    def to_dict(self) -> dict:
        return {**self.__dict__, "fit": self.fit, "error_pct": self.error_pct}


def model_from_shape(name: str, shape: dict) -> Model:
    """A model preset with a published shape of this reference's ``models`` (``fidelity.model_for``: weights counted
    from it, embeddings tied where the model ties them, the block layout read from its ``architecture``)."""
    return fidelity.model_for({**shape, "model": name})


def _gpus(gpus: dict[str, GPU] | None) -> dict[str, GPU]:
    return gpus or {k: get_gpu(v) for k, v in TTFT_PRESET.items()}


def decode_step_s(model: Model, gpu: GPU, tp: int, context: int = ENGINE_STEP_CONTEXT,
                  allreduces: int | None = None) -> float:
    """The simulated batch-1 decode step held in HBM on ``tp`` GPUs (no engine cost): layers, all-reduces (the
    model's count, or ``allreduces``: the engine's own, as its prefill is priced), LM head."""
    rank = parallel.shard(model, tp)
    kv = context * rank.kv_bytes_per_token_layer
    layer = (float(physics.layer_s(rank, gpu, 1, kv))
             + float(parallel.layer_allreduce_s(model, gpu, tp, 1, allreduces=allreduces)))
    return model.num_layers * layer + physics.lm_head_s(rank, gpu, 1)


def rows(gpus: dict[str, GPU] | None = None, reference: dict | None = None) -> list[Row]:
    """Every reference point priced by the prefill physics (``prefill``, ``parallel``) with ``gpus``."""
    reference = reference or load_reference()
    gpus = _gpus(gpus)
    out: list[Row] = []
    for case in reference["gemm_cases"]:
        tp = case.get("tp", 1)
        gpu, model = gpus[case["gpu"]], parallel.shard(fidelity.model_for(case), tp)
        role = "fit" if tp == 1 and "vidur-ops" in FIT_SOURCES else "check"
        for o in case["ops"]:
            n = o["tokens"]
            sim_g = float(prefill.gemm_s(model, gpu, n)) * 1e3
            sim_s = float(prefill.small_ops_s(model, gpu, n)) * 1e3
            out.append(Row("vidur-ops" if tp == 1 else "vidur-ops-tp", "gemm", case["gpu"], case["model"], tp, n,
                           o["gemm_ms"] + o["small_ms"], sim_g + sim_s, role))
    for case in reference["attention_kernels"]:
        gpu = gpus[case["gpu"]]
        shape = Model("kernel", 1, case["heads"], case["head_dim"], case["heads"] * case["head_dim"], case["heads"], 0.0)
        for p in case["points"]:
            L = p["seqlen"]
            flops = 4.0 * float(prefill.attention_pairs(L)) * case["heads"] * case["head_dim"]
            ref = flops / (p["tflops"] * 1e12) * 1e3
            sim = (float(prefill.prefill_attention_s(shape, gpu, L)) - gpu.attn_kernel_s) * 1e3
            out.append(Row(case["source"], "attention", case["gpu"], "attention", 1, L, ref, sim,
                           "fit" if case["source"] in FIT_SOURCES else "held_out"))
    for case in reference["operator_gemm_cases"]:
        gpu = gpus[case["gpu"]]
        model = get_model(case["model"])
        for p in case["points"]:
            sim = float(prefill.gemm_s(model, gpu, p["tokens"])) * 1e3
            out.append(Row("tiersim-h100-operators", "gemm", case["gpu"], case["model"], 1, p["tokens"], p["gemm_ms"],
                           sim, "held_out"))
    shapes = reference["models"]
    roles = {k: v["role"] for k, v in reference["sources"].items()}
    for case in reference["ttft_cases"]:
        gpu, tp, n = gpus[case["gpu"]], case["tp"], case.get("sequences", 1)
        source = case.get("source", "splitwise")
        model = model_from_shape(case["model"], shapes[case["model"]])
        # How many all-reduces per layer: the model's (its layout's) unless the case states its engine's own count
        # (TensorRT-LLM v0.5 reduced Falcon's parallel block twice).
        ar = parallel.allreduces_per_layer(model, case.get("allreduces_per_layer"))
        # The engine-step check: that engine's decode step minus the simulated one (the same all-reduce count as its
        # prefill), charged once per forward.
        excess = case["decode_ms"] - decode_step_s(model, gpu, tp, allreduces=ar) * 1e3 if "decode_ms" in case else None
        for p in case["points"]:
            sim = parallel.tp_prefill_s(model, gpu, tp, p["prompt"], sequences=n, allreduces=ar) * 1e3
            out.append(Row(source, "ttft", case["gpu"], case["model"], tp, p["prompt"], p["ttft_ms"], sim,
                           roles[source], n, ar))
            if excess is not None:
                out.append(Row(f"{source}+engine-step", "ttft", case["gpu"], case["model"], tp, p["prompt"],
                               p["ttft_ms"], sim + excess, "check", n, ar))
    out += dli_ttft_rows(gpus)
    # The engine-line checks: each served trace re-priced with its engine's line fitted on that engine's profile only.
    for check, profile in ENGINE_LINES.items():
        if any(r.source == check for r in out):
            out += engine_line_rows(fit_engine_line(out, profile), out, check)
    return out


def dli_ttft_rows(gpus: dict[str, GPU] | None = None) -> list[Row]:
    """The DLI TensorRT-LLM table's first-token latencies (:data:`DLI_TTFT`): one static batch of ``batch`` prompts
    of ``input`` tokens, priced as one batched prefill (``prefill.prefill_s`` with ``sequences``) with the source's
    engine preset (trtllm: no host cost), role from the data file (``ttft_role``)."""
    gpus = _gpus(gpus)
    doc = decode_fidelity.load()
    src = doc["sources"][DLI_SOURCE]
    out = []
    for p in doc["points"]:
        if p["source"] != DLI_SOURCE or "first_token_ms" not in p:
            continue
        key = DLI_GPUS[p["gpu"]]
        model = decode_fidelity.model_for(doc, p["model"])
        gpu = engines.apply(gpus[key], decode_fidelity.engine_for(doc, DLI_SOURCE, p["gpu"]), model.num_layers)
        sim = float(prefill.prefill_s(model, gpu, p["input"], sequences=p["batch"])) * 1e3
        out.append(Row(DLI_TTFT, "ttft", key, p["model"], 1, p["input"], p["first_token_ms"], sim, src["ttft_role"],
                       p["batch"]))
    return out


#: GEMM efficiencies :func:`fit_dli_line` tries (its per-layer cost is least squares at each); the held-out
#: TensorRT-LLM TTFT sources :func:`line_rows` re-prices with the line.
LINE_GRID = tuple(float(e) for e in np.round(np.arange(0.50, 0.951, 0.01), 2))
TRTLLM_HELD_OUT = ("argonne-trtllm", "trtllm-v0.5-a100", "trtllm-v0.9-a100")


def fit_dli_line(gpus: dict[str, GPU] | None = None) -> dict[str, tuple[float, float]]:
    """A trtllm prefill line fitted on the DLI first-token rows only (a check source), per GPU key: (GEMM efficiency,
    seconds per layer once per forward), least squares on relative error, the cost >= 0, on :data:`LINE_GRID`.
    Not shipped: :func:`line_rows` shows it does not carry over to the held-out TensorRT-LLM sources
    (docs/simulator.md, "Prefill")."""
    gpus = _gpus(gpus)
    doc = decode_fidelity.load()
    engine = doc["sources"][DLI_SOURCE]["engine_overhead"]
    pts = [p for p in doc["points"] if p["source"] == DLI_SOURCE and "first_token_ms" in p]
    out = {}
    for key in sorted({DLI_GPUS[p["gpu"]] for p in pts}):
        sel = [p for p in pts if DLI_GPUS[p["gpu"]] == key]
        models = [decode_fidelity.model_for(doc, p["model"]) for p in sel]
        ref = np.array([p["first_token_ms"] * 1e-3 for p in sel])
        layers = np.array([m.num_layers for m in models], dtype=float)
        best = None
        for e in LINE_GRID:
            g = replace(gpus[key], prefill_gemm_efficiency=e)
            sim = np.array([float(prefill.prefill_s(m, engines.apply(g, engine, m.num_layers), p["input"],
                                                    sequences=p["batch"])) for m, p in zip(models, sel)])
            a, b = layers / ref, 1.0 - sim / ref  # relative error with cost f per layer: a f - b
            f = max(float(a @ b / (a @ a)), 0.0)
            sse = float(np.sum((a * f - b) ** 2))
            if best is None or sse < best[0]:
                best = (sse, e, f)
        out[key] = (best[1], float(f"{best[2]:.3g}"))
    return out


def line_rows(line: dict[str, tuple[float, float]], gpus: dict[str, GPU] | None = None) -> list[Row]:
    """The DLI rows it was fitted on and the held-out TensorRT-LLM TTFT rows (:data:`TRTLLM_HELD_OUT`) re-priced with
    ``line`` (:func:`fit_dli_line`): its GEMM efficiency and its cost per layer per forward where the GPU is one the
    line was fitted on (or reads that one's constants, ``GPU.physics_of``); other GPUs as shipped."""
    gpus = _gpus(gpus)
    by_preset = {gpus[k].name: v for k, v in line.items()}
    shapes, doc = load_reference()["models"], decode_fidelity.load()
    out = []
    for r in rows(gpus):
        if r.source not in (*TRTLLM_HELD_OUT, DLI_TTFT):
            continue
        gpu = gpus[r.gpu]
        fitted = by_preset.get(gpu.name) or by_preset.get(gpu.physics_of)
        if fitted is not None:
            model = (decode_fidelity.model_for(doc, r.model) if r.source == DLI_TTFT
                     else model_from_shape(r.model, shapes[r.model]))
            g = replace(gpu, prefill_gemm_efficiency=fitted[0])
            if r.source == DLI_TTFT:  # its rows are priced with their engine preset, as dli_ttft_rows and the fit do
                g = engines.apply(g, doc["sources"][DLI_SOURCE]["engine_overhead"], model.num_layers)
            sim = (parallel.tp_prefill_s(model, g, r.tp, r.tokens, sequences=r.sequences,
                                         allreduces=r.allreduces_per_layer) + fitted[1] * model.num_layers)
            r = replace(r, simulated_ms=sim * 1e3)
        out.append(r)
    return out


#: The engine line's fit source and the source of the same engine it is checked on (docs/simulator.md, "Prefill"),
#: and every such pair :func:`rows` reports (served trace -> that engine's profile line).
ENGINE_LINE_FIT = "distserve-vllm"
ENGINE_LINE_CHECK = "distserve-vllm-trace"
ENGINE_LINES = {ENGINE_LINE_CHECK: ENGINE_LINE_FIT, "distserve-swift-trace": "distserve-swift"}


def fit_engine_line(points: list[Row] | None = None, source: str = ENGINE_LINE_FIT) -> tuple[float, float]:
    """A per-forward engine prefill line ``measured = scale x simulated + intercept_ms``, least squares on relative
    error over one TTFT source's rows only (default: DistServe's profile of vLLM). Not shipped as a preset: it is one
    engine build's cost, checked by :func:`engine_line_rows` on the same engine's served traces, and shown earlier not
    to carry to other vLLM builds (docs/simulator.md, "Prefill")."""
    sel = [r for r in (rows() if points is None else points) if r.source == source]
    if not sel:
        raise ValueError(f"no rows of source {source!r}")
    ref = np.array([r.reference_ms for r in sel])
    sim = np.array([r.simulated_ms for r in sel])
    scale, intercept = np.linalg.lstsq(np.c_[sim / ref, 1.0 / ref], np.ones(len(sel)), rcond=None)[0]
    return float(f"{scale:.4g}"), float(f"{intercept:.4g}")


def engine_line_rows(line: tuple[float, float], points: list[Row] | None = None,
                     source: str = ENGINE_LINE_CHECK) -> list[Row]:
    """``source``'s rows re-priced with ``line`` (:func:`fit_engine_line`), named ``<source>+line``, role check."""
    scale, intercept = line
    return [replace(r, source=f"{r.source}+line", simulated_ms=scale * r.simulated_ms + intercept, role="check")
            for r in (rows() if points is None else points) if r.source == source]


def summary(points: list[Row]) -> dict[str, dict]:
    """Per source: its role, point count, median and worst |error| (%), and the median signed error."""
    out = {}
    for source in sorted({p.source for p in points}):
        sel = [p for p in points if p.source == source]
        errors = [abs(p.error_pct) for p in sel]
        out[source] = {"role": sel[0].role, "points": len(sel),
                       "median_pct": statistics.median(errors), "worst_pct": max(errors),
                       "median_signed_pct": statistics.median(p.error_pct for p in sel)}
    held = [abs(p.error_pct) for p in points if p.role == "held_out"]
    out["held_out"] = {"role": "held_out", "points": len(held), "median_pct": statistics.median(held) if held else None,
                       "worst_pct": max(held) if held else None}
    return out


def error_rows(gpus: dict[str, GPU] | None = None) -> list[dict]:
    """Every :func:`rows` point as a plain dict (a :class:`Row`'s fields, ``fit`` and ``error_pct``), so
    ``benchmarks/bench_fidelity.py`` reports per source and regime without importing the dataclass."""
    return [r.to_dict() for r in rows(gpus)]


def fit(reference: dict | None = None, sources: frozenset = FIT_SOURCES) -> dict[str, dict[str, float]]:
    """Per GPU, the prefill constants fitted on ``sources`` only (least squares on relative error).

    ``prefill_gemm_efficiency`` by a 1-D search over the GEMM points (the p-norm is not linear in it);
    ``prefill_small_ops_efficiency`` from the small-op points at >= 512 tokens (linear in its inverse);
    the attention pair from the kernel rates, where a GPU has them. Values at 3 significant figures.
    """
    reference = reference or load_reference()
    gpus = _gpus(None)
    out: dict[str, dict[str, float]] = {}
    for key, gpu in gpus.items():
        cases = [c for c in reference["gemm_cases"] if c["gpu"] == key and c.get("tp", 1) == 1] \
            if "vidur-ops" in sources else []
        if not cases:
            continue
        pts = [(fidelity.model_for(c), o) for c in cases for o in c["ops"]]

        def loss(e: float) -> float:
            g = replace(gpu, prefill_gemm_efficiency=e)
            return sum((float(prefill.gemm_s(m, g, o["tokens"])) / (o["gemm_ms"] * 1e-3) - 1) ** 2 for m, o in pts)

        grid = np.round(np.arange(0.50, 0.95, 0.005), 3)
        e_best = float(grid[int(np.argmin([loss(e) for e in grid]))])
        # small ops: t = floor + bytes / (bw x eff): minimise sum ((floor + x b) / t - 1)^2 over x = 1 / (bw eff).
        a, b = [], []
        for m, o in pts:
            if o["tokens"] >= 512:
                t = o["small_ms"] * 1e-3
                a.append(o["tokens"] * prefill.small_ops_bytes_per_token(m) / t)
                b.append(1.0 - physics.small_ops_s(gpu, m) / t)
        x = float(np.dot(a, b) / np.dot(a, a))
        values = {"prefill_gemm_efficiency": e_best, "prefill_small_ops_efficiency": 1.0 / (x * gpu.hbm_bw)}
        kernels = [k for k in reference["attention_kernels"] if k["gpu"] == key and k["source"] in sources]
        if kernels:
            L = np.array([p["seqlen"] for k in kernels for p in k["points"]], dtype=float)
            eff = np.array([p["tflops"] for k in kernels for p in k["points"]]) * 1e12 / gpu.peak_flops
            best = None
            for half in np.arange(0.0, 2000.0, 1.0):  # eff = e L / (L + half): e by least squares per half
                shape = L / (L + half)
                e = float(np.dot(shape, eff) / np.dot(shape, shape))
                err = float(np.sum((e * shape / eff - 1) ** 2))
                if best is None or err < best[0]:
                    best = (err, e, half)
            values.update(prefill_attn_efficiency=best[1], prefill_attn_half_keys=best[2])
        out[key] = {k: float(f"{v:.3g}") for k, v in values.items()}
    return out


def main() -> None:
    """``python -m tiersim.simulator.prefill_fidelity``: the median and worst |error| per source."""
    for source, s in summary(rows()).items():
        print(f"{source:24s} {s['role']:9s} {s['points']:4d} points  median |error| {s['median_pct']:5.1f}%  "
              f"worst {s['worst_pct']:5.1f}%")


if __name__ == "__main__":
    main()
