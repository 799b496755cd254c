"""The profile-driven compute model: measured per-operator times, interpolated; numpy and stdlib only.

An operator profile (kind ``operator-profile``, written by ``python -m tiersim.validator.operators``)
holds, per model shape, device microseconds per call of every GEMM and small op by token count, of
decode attention by batch x context, and whole HF eager decode steps (host issue time). This
module turns one model's tables into the per-layer and per-step times the simulator charges:

* inside a table: piecewise-linear interpolation in log(time) against log(tokens) (GEMMs, small ops)
  and bilinear in log(batch), log(context) (attention): times grow as power laws between points;
* outside it: the roofline (GEMMs, attention) or a linear extension in tokens (element-wise ops, whose
  time is proportional to their bytes once they are past their launch-bound floor); every use outside
  a table is counted, and the simulation output names the compute model and the fallbacks it used.

A profile describes one device: loading one measured on another GPU than the chosen preset is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiersim import fileformat
from tiersim.errors import TiersimError
#: GEMMs of one decoder layer, as HF runs them (separate projections).
LAYER_GEMMS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Small ops per layer and how many times a layer calls each (qk_norm only where the profile has it: Qwen3).
LAYER_SMALL = {"rmsnorm": 2, "rope": 1, "silu_mul": 1, "residual_add": 2, "qk_norm": 1}
#: Per-step ops besides the LM head.
STEP_SMALL = ("embedding", "rotary_emb", "final_norm")


def load_profile(path: str | Path) -> dict:
    """The profile document, or one clear error (missing, not JSON, wrong kind, newer schema)."""
    from tiersim.simulator.calibration import check_objects

    doc, _ = fileformat.read(path, [fileformat.OPERATOR_PROFILE], label="--profile")
    check_objects(doc, f"--profile: {path}", ("device", "settings"))
    if not isinstance(doc.get("models"), dict):
        raise TiersimError(f"--profile: {path} has no 'models' tables")
    return doc


def check_device(doc: dict, gpu_preset: str, option: str = "--profile") -> None:
    """Refuse a measurement from another device than the chosen ``--gpu`` preset, in one line."""
    measured = doc.get("gpu_preset")
    name = (doc.get("device") or {}).get("name") or "an unnamed device"
    if str(name).lower().startswith("cpu"):
        raise TiersimError(f"{option}: measured on {name} (smoke mode), not on a GPU; it describes no --gpu preset")
    if measured is None:
        raise TiersimError(f"{option}: the file names no GPU preset it was measured on ({name}); it cannot "
                           f"describe --gpu {gpu_preset}")
    if measured != gpu_preset:
        raise TiersimError(f"{option}: measured on {name} (preset {measured}), not on --gpu {gpu_preset}; "
                           f"measure this GPU or choose --gpu {measured}")


def _log_interp(x, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Piecewise-linear in log-log space; ``x`` inside [xs[0], xs[-1]] (callers handle the outside)."""
    return np.exp(np.interp(np.log(x), np.log(xs), np.log(ys)))


@dataclass
class OperatorTable:
    """One model's measured tables on one device (microseconds, device time per call)."""

    model: str
    device: str
    gemm: dict[str, tuple[np.ndarray, np.ndarray]]  # op -> (tokens, us)
    gemm_shape: dict[str, tuple[int, int]]  # op -> (k, n)
    small: dict[str, tuple[np.ndarray, np.ndarray]]
    attn_batches: np.ndarray
    attn_contexts: np.ndarray
    attn_us: np.ndarray  # [batch, context], NaN where not measured
    host_batches: np.ndarray = field(default_factory=lambda: np.zeros(0))
    host_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # HF eager host issue time per step
    host_source: str = ""
    fallbacks: set = field(default_factory=set)

    # -- lookups ---------------------------------------------------------------------------------
    def gemm_s(self, op: str, tokens: float, hbm_bw: float, peak_flops: float) -> float:
        xs, ys = self.gemm[op]
        if xs[0] <= tokens <= xs[-1]:
            return float(_log_interp(tokens, xs, ys)) * 1e-6
        self.fallbacks.add(f"{op} at {tokens:g} tokens: roofline")
        k, n = self.gemm_shape[op]
        return max((2 * k * n + 2 * tokens * (k + n)) / hbm_bw, 2 * tokens * k * n / peak_flops)

    def small_s(self, op: str, tokens: float) -> float:
        xs, ys = self.small[op]
        if xs[0] <= tokens <= xs[-1]:
            return float(_log_interp(tokens, xs, ys)) * 1e-6
        self.fallbacks.add(f"{op} at {tokens:g} tokens: linear extension")
        edge = 0 if tokens < xs[0] else -1
        return float(ys[edge] * max(tokens / xs[edge], 1.0 if edge == 0 else 0.0)) * 1e-6

    def attention_s(self, batch: float, context: np.ndarray, kv_bytes_per_token: float, hbm_bw: float) -> np.ndarray:
        """Decode attention per layer, for ``batch`` sequences at each per-sequence ``context``."""
        context = np.atleast_1d(np.asarray(context, dtype=float))
        bs, cs, table = self.attn_batches, self.attn_contexts, self.attn_us
        inside = (bs[0] <= batch <= bs[-1]) & (context >= cs[0]) & (context <= cs[-1])
        out = np.empty_like(context)
        if inside.any():
            # Interpolate along context in each neighbouring batch row, then across batches (all log-log).
            lb = np.log(batch)
            hi = int(np.searchsorted(bs, batch, side="left"))
            hi = min(max(hi, 1), len(bs) - 1)
            lo = hi - 1
            rows = [_log_interp(context[inside], cs, table[i]) for i in (lo, hi)]
            w = 0.0 if bs[hi] == bs[lo] else (lb - np.log(bs[lo])) / (np.log(bs[hi]) - np.log(bs[lo]))
            out[inside] = np.exp((1 - w) * np.log(rows[0]) + w * np.log(rows[1])) * 1e-6
        if (~inside).any():
            self.fallbacks.add(f"attention at batch {batch:g} outside {int(bs[0])}-{int(bs[-1])} x "
                               f"{int(cs[0])}-{int(cs[-1])} context: roofline")
            out[~inside] = batch * context[~inside] * kv_bytes_per_token / hbm_bw
        return out

    def host_s(self, batch: float) -> float:
        """Host issue time of one HF eager decode step at ``batch`` (constant beyond the measured batches)."""
        if not len(self.host_batches):
            return 0.0
        b = float(np.clip(batch, self.host_batches[0], self.host_batches[-1]))
        return float(_log_interp(b, self.host_batches, self.host_ms)) * 1e-3

    def drop_host(self) -> None:
        """Device time only: no host floor (a serving engine that does not launch op by op from Python)."""
        self.host_batches, self.host_ms, self.host_source = np.zeros(0), np.zeros(0), ""

    def describe(self) -> str:
        words = f"profile ({self.model} on {self.device})"
        if self.fallbacks:
            words += "; outside the table: " + "; ".join(sorted(self.fallbacks))
        return words


def _series(rows: list[dict], op: str, key: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((float(r[key]), float(r["device_us"])) for r in rows if r["op"] == op and r.get("device_us"))
    if not pts:
        return np.zeros(0), np.zeros(0)
    xs, ys = (np.array(v) for v in zip(*pts))
    return xs, ys


def table_for(doc: dict, model) -> tuple[OperatorTable | None, str]:
    """(table, None-reason): ``model``'s tables from the profile, or None and why the roofline is used.

    A hand-edited or damaged file (a row without its fields, a string where a number belongs) is one line.
    """
    try:
        return _table_for(doc, model)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise TiersimError(f"--profile: the {model.name} tables are malformed ({type(exc).__name__}: {exc})") from None


def _table_for(doc: dict, model) -> tuple[OperatorTable | None, str]:
    entry = doc["models"].get(model.name)
    source = doc.get("device", {}).get("name", "unknown device")
    if entry is None:
        return None, f"roofline (the profile has no table for {model.name}; it has {', '.join(doc['models']) or 'none'})"
    shape = entry.get("shape", {})
    if shape.get("hidden_size") != model.hidden_size or shape.get("num_layers") != model.num_layers:
        return None, f"roofline (the profile's {model.name} has another shape than the model preset)"
    gemm, gemm_shape = {}, {}
    for op in (*LAYER_GEMMS, "lm_head"):
        xs, ys = _series(entry.get("gemm", []), op)
        if not len(xs):
            return None, f"roofline (the profile's {model.name} table lacks {op})"
        gemm[op] = (xs, ys)
        row = next(r for r in entry["gemm"] if r["op"] == op)
        gemm_shape[op] = (int(row["k"]), int(row["n"]))
    small = {}
    for op in (*LAYER_SMALL, *STEP_SMALL):
        xs, ys = _series(entry.get("small", []), op)
        if len(xs):
            small[op] = (xs, ys)
        elif op != "qk_norm":
            return None, f"roofline (the profile's {model.name} table lacks {op})"
    # The attention kernel the validator's decode uses (no cuDNN) when the profile timed it.
    rows = entry.get("attention", [])
    attn = [r for r in rows if r["op"] == "sdpa_decode_no_cudnn" and r.get("device_us")]
    attn = attn or [r for r in rows if r["op"] == "sdpa_decode" and r.get("device_us")]
    if not attn:
        return None, f"roofline (the profile's {model.name} table has no decode attention)"
    bs = np.array(sorted({float(r["batch"]) for r in attn}))
    cs = np.array(sorted({float(r["context"]) for r in attn}))
    grid = np.full((len(bs), len(cs)), np.nan)
    for r in attn:
        grid[np.searchsorted(bs, r["batch"]), np.searchsorted(cs, r["context"])] = r["device_us"]
    if np.isnan(grid).any():  # an out-of-memory corner: fill along context from the nearest measured cell
        for i in range(len(bs)):
            ok = ~np.isnan(grid[i])
            if not ok.any():
                return None, f"roofline (the profile's {model.name} attention table has an empty batch row)"
            grid[i, ~ok] = np.interp(cs[~ok], cs[ok], grid[i, ok])
    hb, hm, host_source = _host_series(entry.get("decode", []))
    return OperatorTable(model.name, source, gemm, gemm_shape, small, bs, cs, grid, hb, hm, host_source), ""


def _host_series(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, str]:
    """Median host issue time per batch of the DynamicCache decode rows (``no-cudnn`` rows when present:
    cuDNN attention's per-length plan build is a harness artefact, not a cost of decoding)."""
    rows = [r for r in rows if r.get("cache") == "dynamic" and r.get("cpu_issue_ms")]
    clean = [r for r in rows if r.get("sdpa") == "no-cudnn"]
    if rows and not clean:
        # Default-SDPA steps on a cuDNN machine include a plan build per new KV length (tens of ms): a
        # floor from them is larger than real steps (measured: 55.7 ms against a 29.7 ms step). No floor.
        return np.zeros(0), np.zeros(0), "none (the profile's decode steps ran default SDPA, cuDNN plan builds inside)"
    by_batch: dict[float, list[float]] = {}
    source = "no-cudnn decode steps"
    for r in clean:
        by_batch.setdefault(float(r["batch"]), []).append(float(r["cpu_issue_ms"]))
    if not by_batch:
        return np.zeros(0), np.zeros(0), "none measured"
    bs = np.array(sorted(by_batch))
    return bs, np.array([float(np.median(by_batch[b])) for b in bs]), source
