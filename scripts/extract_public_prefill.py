"""Rebuild tiersim/data/public-prefill-profiles.json from the public sources it cites.

Usage: python scripts/extract_public_prefill.py VIDUR_DIR SPLITWISE_CSV ARGONNE_TTFT_CSV DISTSERVE_PROFILE_DIR [OUT]
   or: python scripts/extract_public_prefill.py --distserve-trace DISTSERVE_TRACE_DIR [OUT]
   or: python scripts/extract_public_prefill.py --trtllm-perf PERFORMANCE_MD [OUT]
VIDUR_DIR holds data/profiling/compute/<gpu>/<org>/<model>/mlp.csv as in github.com/microsoft/vidur @ 7d47513;
SPLITWISE_CSV is data/perf_model.csv of github.com/Mutinifni/splitwise-sim @ 8f99e7d; ARGONNE_TTFT_CSV is
Plots/Fig_21/all_results_TTFT.csv of github.com/argonne-lcf/LLM-Inference-Bench @ 4211f5d; DISTSERVE_PROFILE_DIR
holds profiler-a100-80g.{vllm,distserve}.json as in github.com/LLMServe/DistServe @ 82831f1,
simdistserve/estimators/profile_data. DISTSERVE_TRACE_DIR holds the vllm-*.exp and distserve-c21*.exp request traces of
simdistserve/benchmarks/alignment/data-ground-truth/opt-13b-sharegpt at DistServe @ 20a1633 (branch feat-add-simulator);
the second form rebuilds that source's cases only. PERFORMANCE_MD is docs/source/performance.md of
github.com/NVIDIA/TensorRT-LLM @ 250d9c2 (TensorRT-LLM 0.9.0's tables); the third form rebuilds the trtllm-v0.9-a100
cases only, from its "Low Latency" A100 (FP16) table. The kernel figures
(FlashAttention-3 on H100), TensorRT-LLM's published first-token table and this project's own H100 GEMM run are
transcribed by hand where the file says: the TTFT cases of other sources are kept as they are.
"""

from __future__ import annotations

import ast
import json
import statistics
import sys
from pathlib import Path

import pandas as pd

from tiersim.atomic import write_text

GEMMS = ["attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"]
SMALL = ["input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add"]
TOKENS = [128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
#: Models whose tensor-parallel rows (the shard's GEMMs at TP 2/4/8) are kept too, as a check of the shard.
TP_MODELS = {"Llama-2-70b-hf", "CodeLlama-34b-Instruct-hf"}
VIDUR_LAYERS = {"Llama-2-7b-hf": 32, "Meta-Llama-3-8B": 32, "CodeLlama-34b-Instruct-hf": 48, "Llama-2-70b-hf": 80,
                "Meta-Llama-3-70B": 80, "internlm-20b": 60, "Qwen-72B": 80, "phi-2": 32}
#: Each profiled model's ``model_type`` (its config.json on huggingface.co), which vidur's CSV does not state: the
#: block layout is read from it (``shapes.block_layout``: phi-2 is the parallel block vidur profiles).
VIDUR_ARCHITECTURES = {"Llama-2-7b-hf": "llama", "Meta-Llama-3-8B": "llama", "CodeLlama-34b-Instruct-hf": "llama",
                       "Llama-2-70b-hf": "llama", "Meta-Llama-3-70B": "llama", "internlm-20b": "internlm",
                       "Qwen-72B": "qwen", "phi-2": "phi"}


def vidur_cases(root: Path) -> list[dict]:
    cases = []
    for gpu in ("a100", "h100"):
        for path in sorted((root / "data/profiling/compute" / gpu).glob("*/*/mlp.csv")):
            full = pd.read_csv(path)
            for tp in sorted(full.num_tensor_parallel_workers.unique()):
                if tp > 1 and path.parent.name not in TP_MODELS:
                    continue
                cases.append(_vidur_case(gpu, path, full[full.num_tensor_parallel_workers == tp], int(tp)))
    return cases


def _vidur_case(gpu: str, path: Path, df: pd.DataFrame, tp: int) -> dict:
    """Per-layer GEMM and small-op sums (medians, ms) at the stored token counts for one model and TP degree."""
    med = df.groupby("num_tokens").median(numeric_only=True)
    r0 = df.iloc[0]
    ops = []
    for n in TOKENS:
        if n not in med.index:
            continue
        row = med.loc[n]
        ops.append({"tokens": n, "gemm_ms": round(float(sum(row[f"time_stats.{o}.median"] for o in GEMMS)), 4),
                    "small_ms": round(float(sum(row.get(f"time_stats.{o}.median", 0.0) for o in SMALL)), 4)})
    model = path.parent.name
    return {"gpu": gpu, "model": model, "hf_id": f"{path.parent.parent.name}/{model}",
            "architecture": VIDUR_ARCHITECTURES[model], "tp": tp,
            "num_layers": VIDUR_LAYERS[model], "hidden_size": int(r0.n_embd),
            "num_attention_heads": int(r0.n_head), "num_kv_heads": int(r0.n_kv_head),
            "intermediate_size": int(r0.n_expanded_embd), "gated_mlp": bool(r0.use_gated_mlp),
            "vocab_size": int(r0.vocab_size), "ops": ops}


def splitwise_cases(csv: Path) -> list[dict]:
    """Batch-1 prompt phase per (model, GPU, TP); ``decode_ms``: the same runs' median batch-1 token time (what that
    engine takes per decode step, read by the engine-step check, never by a fit)."""
    df = pd.read_csv(csv)
    df = df[(df.batch_size == 1) & (df.hardware.isin(["a100-80gb", "h100-80gb"]))]
    keys = ["model", "hardware", "tensor_parallel"]
    med = df.groupby([*keys, "prompt_size"]).prompt_time.median()
    decode = df.groupby(keys).token_time.median()
    out = []
    for (model, hw, tp), sub in med.groupby(level=[0, 1, 2]):
        out.append({"source": "splitwise", "gpu": hw.split("-")[0], "model": model, "tp": int(tp), "sequences": 1,
                    "decode_ms": round(float(decode[(model, hw, tp)]), 2),
                    "points": [{"prompt": int(k[3]), "ttft_ms": round(float(v), 2)} for k, v in sub.items()]})
    return out


#: LLM-Inference-Bench's hardware and framework names -> this project's GPU keys and source names (hardware
#: without a preset here, AMD, Intel, SambaNova, is left out).
ARGONNE_GPUS = {"Nvidia A100 GPU": "a100-40gb", "Nvidia H100 GPU": "h100", "Nvidia GH200 GPU": "gh200"}  # Polaris: 40 GB
ARGONNE_SOURCES = {"vLLM": "argonne-vllm", "TensorRT-LLM": "argonne-trtllm", "Deepspeed-MII": "argonne-dsmii"}
ARGONNE_MODELS = {"meta-llama/Llama-2-7b-hf": "llama2-7b", "meta-llama/Meta-Llama-3-8B": "llama3-8b",
                  "mistralai/Mistral-7B-v0.1": "mistral-7b"}


def argonne_cases(csv: Path) -> list[dict]:
    """One batch of equal prompts per (framework, GPU, model): input length, 1 output token, latency in s -> ms."""
    df = pd.read_csv(csv).dropna(subset=["Latency"])
    df = df[df.Hardware.isin(ARGONNE_GPUS) & df.Framework.isin(ARGONNE_SOURCES) & (df["Output Length"] == 1)]
    out = []
    for _, r in df.iterrows():
        point = {"prompt": int(r["Input Length"]), "ttft_ms": round(float(r.Latency) * 1e3, 2)}
        out.append({"source": ARGONNE_SOURCES[r.Framework], "gpu": ARGONNE_GPUS[r.Hardware],
                    "model": ARGONNE_MODELS[r.Model], "tp": int(r["Num of Hardware"]),
                    "sequences": int(r["Batch Size"]), "points": [point]})
    return out


#: DistServe's profiled engines (its fitted prefill line per model and TP) -> source names; the prompt lengths the
#: line is evaluated at (OPT's 2048-position window bounds what was profiled).
DISTSERVE_SOURCES = {"vllm": "distserve-vllm", "distserve": "distserve-swift"}
DISTSERVE_MODELS = {"facebook/opt-13b": "opt-13b", "facebook/opt-66b": "opt-66b"}
DISTSERVE_PROMPTS = (128, 512, 1024, 2048)


def distserve_cases(root: Path) -> list[dict]:
    """One batch-1 prompt per (engine, model, TP): DistServe's line ``a + b n + c n^2`` (ms) at each prompt length."""
    out = []
    for engine, source in DISTSERVE_SOURCES.items():
        doc = json.loads((root / f"profiler-a100-80g.{engine}.json").read_text())
        for hf, per_tp in doc.items():
            for tp, params in per_tp.items():
                if int(tp) not in (1, 2, 4, 8):  # TP 3 is not a sharding this project prices
                    continue
                a, b, c = params["prefill"]
                points = [{"prompt": n, "ttft_ms": round(a + b * n + c * n * n, 2)} for n in DISTSERVE_PROMPTS]
                out.append({"source": source, "gpu": "a100", "model": DISTSERVE_MODELS[hf], "tp": int(tp),
                            "sequences": 1, "line_ms": [a, b, c], "points": points})
    return out


#: DistServe's served traces (simdistserve/benchmarks/alignment/align_with_real.py of the same commit: OPT-13B on
#: A100-80GB; vLLM colocated at TP 1; DistServe's own engine disaggregated, its prefill instance at TP 2 in the
#: "c21" runs, the decode instance on other GPUs) -> (source, prefill TP, whether another request's decode shares
#: the GPUs). DistServe's runs without a stated configuration (distserve-N-rate.exp) are left out.
DISTSERVE_TRACES = {"vllm-*.exp": ("distserve-vllm-trace", 1, True), "distserve-c21*.exp": ("distserve-swift-trace", 2, False)}
#: A prompt is kept when it ran alone in at least this many runs (the runs replay one seeded workload): its TTFT is
#: then a repeated measurement, the median over those runs.
TRACE_MIN_RUNS = 3


def distserve_trace_cases(root: Path) -> list[dict]:
    """One request's TTFT from the DistServe authors' served traces: only the requests that had the prefill GPUs to
    themselves, so the TTFT holds no queueing and no other request's work: no other request in flight at all between
    their issue and first token where decodes share the GPUs (vLLM), no other request's prefill where they do not
    (DistServe's prefill instance). Per prompt length seen alone in >= TRACE_MIN_RUNS runs, the median over them."""
    out = []
    for pattern, (source, tp, colocated) in DISTSERVE_TRACES.items():
        alone: dict[int, list[float]] = {}
        for path in sorted(root.glob(pattern)):
            reqs = ast.literal_eval(path.read_text().strip().splitlines()[0])
            for i, r in enumerate(reqs):
                t0, t1 = r["issue_time"], r["first_token_time"]
                busy_until = "complete_time" if colocated else "first_token_time"
                if all(o[busy_until] <= t0 or o["issue_time"] >= t1 for j, o in enumerate(reqs) if j != i):
                    alone.setdefault(int(r["prompt_len"]), []).append(float(r["ttft_ms"]))
        points = [{"prompt": n, "ttft_ms": round(statistics.median(v), 2), "runs": len(v),
                   "range_ms": [round(min(v), 2), round(max(v), 2)]}
                  for n, v in sorted(alone.items()) if len(v) >= TRACE_MIN_RUNS]
        if not points:
            raise SystemExit(f"no {pattern} prompt ran alone in {TRACE_MIN_RUNS} runs under {root}")
        out.append({"source": source, "gpu": "a100", "model": "opt-13b", "tp": tp, "sequences": 1, "points": points})
    return out


#: TensorRT-LLM 0.9.0's performance page: the section and table read, the release it must state, and its model names ->
#: this file's model keys. Every other table of the page is FP8 (H100, H200, L40S: not modelled here). Mixtral 8x7B is
#: left out (a mixture of experts: no MoE physics here); a model name in neither list is an error, so a changed table
#: cannot lose rows silently. Only rows at TP > 1 are kept: the TP 1 rows are the DLI table's batch-1 first-token
#: latencies of the same release and GPU (public-decode-steps.json, nvidia-dli-trtllm: 136.42 -> 136.4, 132.46 -> 132.4,
#: 139.69 -> 139.6 ms), already priced as a check (that table's decode fit read its rows), not a second source.
TRTLLM_PERF_SOURCE = "trtllm-v0.9-a100"
TRTLLM_PERF_SECTION = "## Low Latency"
TRTLLM_PERF_TABLE = "### A100 GPUs (FP16)"
TRTLLM_PERF_VERSION = "All data was generated using version 0.9.0"
TRTLLM_PERF_MODELS = {"GPT-J 6B": "gptj-6b", "Mistral 7B": "mistral-7b", "LLaMA 7B": "llama2-7b",
                      "LLaMA 70B": "llama2-70b", "Falcon 180B": "falcon-180b"}
TRTLLM_PERF_LEFT_OUT = {"Mixtral 8x7B"}
#: No all-reduce count is written per case: this release runs each model with the count its shape states
#: (``Model.allreduces_per_layer``: one for Falcon-180B's parallel block, whose two row-parallel outputs it sums and
#: reduces once, tensorrt_llm/models/falcon/model.py from late 2023 on, e.g. @ 585c756; two for the Llama rows).


def trtllm_perf_cases(md: Path) -> list[dict]:
    """The batch-1 first-token latencies of TensorRT-LLM 0.9.0's A100 (FP16) low-latency table at TP > 1: one case
    per (model, TP, batch) as the table states them (its rows name the TP per input length), points (input length,
    ms). The batch is part of the key: a row of another batch merged into a case would be priced at that case's."""
    if not md.is_file():
        raise SystemExit(f"{md}: not found (docs/source/performance.md of TensorRT-LLM @ 250d9c2)")
    text = md.read_text()
    if TRTLLM_PERF_SECTION not in text:
        raise SystemExit(f"{md}: no {TRTLLM_PERF_SECTION!r} section")
    section = text[text.index(TRTLLM_PERF_SECTION):]
    if TRTLLM_PERF_VERSION not in section.split("\n### ", 1)[0]:
        raise SystemExit(f"{md}: the low-latency section does not say {TRTLLM_PERF_VERSION!r}")
    if TRTLLM_PERF_TABLE not in section:
        raise SystemExit(f"{md}: no {TRTLLM_PERF_TABLE!r} table in {TRTLLM_PERF_SECTION!r}")
    table = section[section.index(TRTLLM_PERF_TABLE) + len(TRTLLM_PERF_TABLE):]
    cases: dict[tuple[str, int, int], dict] = {}
    for line in table.splitlines():
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 5 or not cells[0] or not cells[1].isdigit():
            continue  # header, separator, blank spacer rows, prose
        name = cells[0]
        try:  # a changed page is one line naming the row, not a ValueError traceback
            batch, tp, tokens, ms = int(cells[1]), int(cells[2]), int(cells[3]), float(cells[4])
        except ValueError:
            raise SystemExit(f"{md}: row {line.strip()!r} of {TRTLLM_PERF_TABLE!r}: expected batch, TP and input "
                             "length as integers and the latency in ms as a number") from None
        if name in TRTLLM_PERF_LEFT_OUT or tp == 1:
            continue
        if name not in TRTLLM_PERF_MODELS:
            raise SystemExit(f"{md}: model {name!r} of {TRTLLM_PERF_TABLE!r} is neither mapped nor left out")
        model = TRTLLM_PERF_MODELS[name]
        case = cases.setdefault((model, tp, batch), {"source": TRTLLM_PERF_SOURCE, "gpu": "a100", "model": model,
                                              "tp": tp, "sequences": batch, "points": []})
        case["points"].append({"prompt": tokens, "ttft_ms": ms})
    if not cases:
        raise SystemExit(f"{md}: no rows in {TRTLLM_PERF_TABLE!r}")
    return list(cases.values())


def _write(out: Path, data: dict, rebuilt: list[dict]) -> None:
    sources = {case["source"] for case in rebuilt}
    kept = [c for c in data.get("ttft_cases", []) if c.get("source", "splitwise") not in sources]
    data["ttft_cases"] = rebuilt + kept
    write_text(out, json.dumps(data, indent=1) + "\n")  # atomically: a failed run leaves the shipped file whole


def main(argv: list[str]) -> None:
    single = {"--distserve-trace": ("DISTSERVE_TRACE_DIR", distserve_trace_cases),
              "--trtllm-perf": ("PERFORMANCE_MD", trtllm_perf_cases)}
    if len(argv) > 1 and argv[1] in single:
        what, cases = single[argv[1]]
        if len(argv) < 3:
            raise SystemExit(f"usage: extract_public_prefill.py {argv[1]} {what} [OUT]")
        out = Path(argv[3]) if len(argv) > 3 else Path("tiersim/data/public-prefill-profiles.json")
        _write(out, json.loads(out.read_text()), cases(Path(argv[2])))
        return
    if len(argv) < 5:
        raise SystemExit("usage: extract_public_prefill.py VIDUR_DIR SPLITWISE_CSV ARGONNE_TTFT_CSV "
                         "DISTSERVE_PROFILE_DIR [OUT] (or --distserve-trace, --trtllm-perf: see the module's help)")
    vidur, split, argonne, distserve = Path(argv[1]), Path(argv[2]), Path(argv[3]), Path(argv[4])
    out = Path(argv[5]) if len(argv) > 5 else Path("tiersim/data/public-prefill-profiles.json")
    data = json.loads(out.read_text()) if out.exists() else {}
    data["gemm_cases"] = vidur_cases(vidur)
    _write(out, data, splitwise_cases(split) + argonne_cases(argonne) + distserve_cases(distserve))


if __name__ == "__main__":
    main(sys.argv)
