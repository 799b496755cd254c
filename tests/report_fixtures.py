"""Realistic report inputs written per docs/file-formats.md, computed from small physical models.

Used by tests/test_report*.py (no tests of its own); nothing here is a stored result:
every number comes from the formulas below (H100-class link, R1-Distill-Qwen-7B shape).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

GB = 1e9
MODEL = {"name": "r1-distill-qwen-7b", "num_layers": 28, "num_kv_heads": 4, "head_dim": 128, "hidden_size": 3584,
         "num_attention_heads": 28, "params": 7.62e9, "param_bytes": 2.0, "kv_dtype_bytes": 2,
         "kv_bytes_per_token": 57344}
GPU = {"name": "h100-sxm", "hbm_bytes": 80 * GB, "h2d_bw": 50 * GB, "d2h_bw": 50 * GB, "bidir_bw": 83 * GB,
       "copy_latency": 5e-6}
WEIGHTS_GB = MODEL["params"] * MODEL["param_bytes"] / GB
RESERVED_GB = 2.56
COMPUTE_MS = 8.7
VERSION = "0.1.0"


def timeline(batch: int = 64, hbm: float = 0.5, evict: float = 0.0, steps: int = 256, context0: float = 1950.0,
             capacity_gb: float = 80.0) -> pd.DataFrame:
    """Per-step HBM use and link traffic of one config: the DDR share is prefetched every step."""
    step = np.arange(steps)
    context = context0 + step
    kv_full = context * batch * MODEL["kv_bytes_per_token"] / GB
    kv_hbm = kv_full * hbm
    ddr = 1.0 - hbm - evict
    staging = np.full(steps, 2 * kv_full[0] * ddr / MODEL["num_layers"])
    h2d = kv_full * ddr
    d2h = np.where(step % 16 == 0, 0.02 * kv_full * ddr, batch * MODEL["kv_bytes_per_token"] * ddr / GB)
    compute = COMPUTE_MS + 0.0004 * step
    link_ms = h2d / (GPU["h2d_bw"] / GB) * 1e3
    stall = np.maximum(link_ms - compute, 0.0)
    return pd.DataFrame({
        "step": step.astype("int32"), "context_tokens_mean": context, "weights_gb": WEIGHTS_GB, "kv_hbm_gb": kv_hbm,
        "staging_gb": staging, "activations_gb": RESERVED_GB,
        "free_gb": capacity_gb - WEIGHTS_GB - kv_hbm - staging - RESERVED_GB, "hbm_capacity_gb": capacity_gb,
        "h2d_gb": h2d, "d2h_gb": d2h, "compute_ms": compute, "stall_ms": stall, "step_ms": compute + stall,
    })


def simulation_meta(batch: int = 64, hbm: float = 0.5, evict: float = 0.0, frame: pd.DataFrame | None = None) -> dict:
    frame = timeline(batch, hbm, evict) if frame is None else frame
    base_ms = float(frame["compute_ms"].mean())
    kv_full = float(frame["context_tokens_mean"].max()) * batch * MODEL["kv_bytes_per_token"] / GB
    summary = {"hbm": hbm, "ddr": 1 - hbm - evict, "compressed": 0.0, "evict": evict, "batch": batch,
               "kv_full_gb": kv_full, "hbm_saved_gb": kv_full * (1 - hbm) - float(frame["staging_gb"].iloc[0]),
               "step_ms": float(frame["step_ms"].mean()), "stall_ms": float(frame["stall_ms"].mean()),
               "overhead_pct": (float(frame["step_ms"].mean()) / base_ms - 1) * 100,
               "tokens_per_s": batch / float(frame["step_ms"].mean()) * 1e3}
    return {"kind": "simulation", "schema_version": 1, "tiersim_version": VERSION, "model": MODEL, "gpu": GPU,
            "trace": "bundled", "batch": batch, "config": {k: summary[k] for k in ("hbm", "ddr", "compressed", "evict")},
            "summary": summary}


def write_simulation(path: Path, batch: int = 64, hbm: float = 0.5, evict: float = 0.0) -> Path:
    frame = timeline(batch, hbm, evict)
    meta = simulation_meta(batch, hbm, evict, frame)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"tiersim": json.dumps(meta).encode()}), path)
    return path


def _config_row(batch: int, hbm: float, evict: float, context: float = 1950.0) -> dict:
    kv_full = context * batch * MODEL["kv_bytes_per_token"] / GB
    ddr = round(1.0 - hbm - evict, 6)
    staging = 2 * kv_full * ddr / MODEL["num_layers"]
    compute = COMPUTE_MS * (1 + batch / 512) * (1 - 0.3 * evict)
    base = COMPUTE_MS * (1 + batch / 512)
    link = kv_full * ddr / (GPU["h2d_bw"] / GB) * 1e3
    stall = max(link - compute, 0.0)
    peak = WEIGHTS_GB + RESERVED_GB + kv_full * hbm + staging
    step = compute + stall
    return {"batch": batch, "hbm": hbm, "ddr": ddr, "compressed": 0.0, "evict": evict, "context_tokens_mean": context,
            "kv_full_gb": kv_full, "kv_hbm_gb": kv_full * hbm, "staging_gb": staging,
            "hbm_saved_gb": kv_full * (1 - hbm) - staging, "peak_hbm_gb": peak, "fits": bool(peak <= 80.0),
            "step_ms": step, "stall_ms": stall, "overhead_pct": (step / base - 1) * 100,
            "tokens_per_s": batch / step * 1e3,
            "max_batch": int((80.0 - WEIGHTS_GB - RESERVED_GB) / (context * MODEL["kv_bytes_per_token"] / GB * max(hbm, 0.05)))}


def capacity_document(batch: int = 64, max_overhead: float = 10.0) -> dict:
    """A capacity grid whose best config and batch sweep follow the planner's rules."""
    rows = [_config_row(batch, h, e) for e in (0.0, 0.03, 0.1) for h in (1.0 - e, 0.9, 0.75, 0.5, 0.25) if h <= 1 - e]
    eligible = [r for r in rows if r["fits"] and r["overhead_pct"] <= max_overhead and r["hbm_saved_gb"] > 0]
    best = max(eligible, key=lambda r: r["hbm_saved_gb"]) if eligible else None
    sweep = [{k: r[k] for k in ("batch", "hbm", "ddr", "evict", "hbm_saved_gb", "peak_hbm_gb", "overhead_pct",
                                "stall_ms", "step_ms", "fits")}
             for b in (1, 8, 16, 32, 64, 128, 256, 512) for r in [_config_row(b, h, 0.0) for h in (1.0, 0.75, 0.5, 0.25)]]
    # The planner's points: prefetch (the grid's physics) and an approximate strategy 30% quicker on the link.
    points = []
    for b in (16, 64, 256):
        for h in (1.0, 0.75, 0.5):
            r = _config_row(b, h, 0.0)
            names = ["none"] if h == 1.0 else ["prefetch", "compressed-transfer"]
            for name in names:
                tpot = r["step_ms"] if name != "compressed-transfer" else r["step_ms"] - 0.3 * r["stall_ms"]
                points.append({**r, "strategy": name, "approximate": name == "compressed-transfer",
                               "tpot_ms": tpot, "tokens_per_s": b / tpot * 1e3})
    full = next(p for p in points if p["batch"] == 64 and p["strategy"] == "none")
    planner = {"tpot_slo_ms": 50.0, "full_cache": full, "max_batch_full_cache": rows[0]["max_batch"]}
    return {"kind": "capacity", "schema_version": 1, "tiersim_version": VERSION, "model": MODEL["name"],
            "gpu": GPU["name"], "batch": batch, "trace": "bundled", "mean_length": 3900.0,
            "max_overhead_pct": max_overhead, "rows": rows, "recommendation": "Keep the full cache (a fixture).",
            "max_batch_full_cache": rows[0]["max_batch"], "best": best, "batch_sweep": sweep,
            "planner": planner, "points": points}


def quality_document(seed: int = 0) -> dict:
    """Hierarchy cells (exact at evict 0 whatever the HBM share) and baselines at each HBM budget < 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for hbm in (1.0, 0.5, 0.25):
        for evict in (0.0, 0.03, 0.1):
            em = 1.0 if evict == 0 else float(np.clip(1 - 6 * evict - rng.uniform(0, 0.1), 0, 1))
            rows.append({"method": "hierarchy", "hbm": hbm, "ddr": round(1 - hbm - evict, 6) if hbm < 1 else 0.0,
                         "compressed": 0.0, "evict": evict if hbm < 1 or evict == 0 else evict,
                         "exact_match": em, "mean_tokens_to_divergence": 64 * em + 10 * (1 - em),
                         "answer_agreement": min(1.0, em + 0.1), "accuracy": 0.6 * em, "full_cache_accuracy": 0.6})
    for method, strength in (("h2o", 0.35), ("rkv", 0.3), ("snapkv", 0.25), ("streamingllm", 0.1)):
        for hbm in (0.5, 0.25):
            em = float(np.clip(strength * hbm * 2 + rng.uniform(-0.05, 0.05), 0, 1))
            rows.append({"method": method, "hbm": hbm, "ddr": 0.0, "compressed": 0.0, "evict": 1 - hbm,
                         "exact_match": em, "mean_tokens_to_divergence": 20 * em, "answer_agreement": em,
                         "accuracy": None, "full_cache_accuracy": 0.6})
    return {"kind": "quality-grid", "schema_version": 1, "tiersim_version": VERSION, "model": "smollm2-135m-instruct",
            "n_prompts": 10, "max_new_tokens": 64, "prompts_source": "bundled", "device": "cpu",
            "full_cache": {"accuracy": 0.6}, "rows": rows}


def write_quality_parquet(path: Path, document: dict) -> Path:
    meta = {k: v for k, v in document.items() if k != "rows"}
    table = pa.Table.from_pandas(pd.DataFrame(document["rows"]), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"tiersim": json.dumps(meta).encode()}), path)
    return path


def calibration_document(seed: int = 1) -> dict:
    """Link sweep from latency + size/bandwidth, and step times a simulator would miss by a few %."""
    rng = np.random.default_rng(seed)
    latency, h2d, d2h, both = 5e-6, 48.0, 52.0, 83.0
    sweep = []
    for exp in range(12, 29, 2):
        size = 2 ** exp
        for direction, bw in (("h2d", h2d), ("d2h", d2h), ("both", both)):
            seconds = latency + size / (bw * GB)
            sweep.append({"bytes": size, "direction": direction, "seconds": seconds, "gbps": size / seconds / GB})
    points = []
    for batch in (1, 8):
        for context in (2048, 8192):
            for hbm in (1.0, 0.5, 0.25):
                kv = context * batch * 28 * 2 * 2 * 128 * 2 / GB
                base = 6.0 + kv / 3.0
                h2d_gb = kv * (1 - hbm)
                stall = max(h2d_gb / h2d * 1e3 - base * 0.8, 0.0)
                measured = (base + stall) * (1 + rng.uniform(-0.02, 0.06))
                simulated = base + stall
                points.append({"model_shape": "r1-distill-qwen-1.5b", "batch": batch, "context": context, "hbm": hbm,
                               "measured_step_ms": measured, "baseline_step_ms": base, "stall_ms": stall,
                               "h2d_bytes": int(h2d_gb * GB), "overhead_pct": (measured / base - 1) * 100,
                               "simulated_step_ms": simulated, "sim_error_pct": (simulated / measured - 1) * 100})
    return {"kind": "calibration", "schema_version": 1, "tiersim_version": VERSION,
            "device": {"name": "NVIDIA H100 80GB HBM3", "driver": "550.54", "torch": "2.5.1", "cuda": "12.4"},
            "link": {"h2d_gbps": h2d, "d2h_gbps": d2h, "bidir_total_gbps": both, "copy_latency_us": latency * 1e6,
                     "sweep": sweep},
            "compute": {"hbm_bw_gbps": 2900.0, "peak_tflops": 700.0, "layer_overhead_us": 11.0},
            "points": points, "sim_error_pct": [p["sim_error_pct"] for p in points],
            "overhead_pct": [p["overhead_pct"] for p in points]}


def write_all(folder: Path) -> dict[str, Path]:
    """One file of every kind (quality grid twice: JSON and Parquet)."""
    folder.mkdir(parents=True, exist_ok=True)
    quality = quality_document()
    paths = {
        "simulation": write_simulation(folder / "sim.parquet"),
        "capacity": folder / "capacity.json",
        "quality-grid": folder / "grid.json",
        "quality-grid-parquet": write_quality_parquet(folder / "grid.parquet", quality),
        "calibration": folder / "h100.json",
    }
    paths["capacity"].write_text(json.dumps(capacity_document()))
    paths["quality-grid"].write_text(json.dumps(quality))
    paths["calibration"].write_text(json.dumps(calibration_document()))
    return paths
