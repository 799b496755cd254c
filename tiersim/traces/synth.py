"""Synthetic traces for reasoning lengths no CPU capture reaches (GSM8K ~1.5K, MATH-500 ~3.9K, AIME ~14K).

The model (documented in docs/trace-format.md):

* Tier counts are not fitted: they follow from the policy (ratios, sinks, recent window,
  re-tiering interval) exactly as the cache computes them, via :func:`tier_targets`.
* Churn, the swaps the policy makes at a re-tiering point on top of the net count changes, is
  fitted per move type as a fraction of the context: ``swap / T = a * T**b`` (least squares in
  log space over the captured re-tiering steps; ``b = 0`` when the trace spans too little).
* Attention mass per tier is fitted per layer as a density ratio ``rho = mass share / token
  share`` (with a log-normal spread); synthetic steps draw ``rho`` and renormalise.
* The DDR cover counts (tokens holding 90% / 99% of the DDR mass) are fitted per layer as a
  fraction of the DDR tier (mean and spread).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig, tier_targets_array
from tiersim.traces.format import COLUMNS, Trace, new_meta
from tiersim.options import available_memory
from tiersim.traces.lengths import LENGTH_PRESETS, MAX_SIGMA, parse_lengths  # noqa: F401 (re-exported)

MOVES = ("hbm_ddr", "compressed")


@dataclass
class TraceProfile:
    """Statistics fitted on a captured trace; enough to synthesise traces of any length."""

    policy: dict
    model: dict
    prompt_len: float
    churn: dict  # move type -> [a, b, log_std]
    mass_rho: list  # per layer: [[log_rho_mean, log_rho_std] for hbm, ddr, compressed]
    cover: list  # per layer: [c90_mean, c90_std, c99_mean, c99_std] as fractions of n_ddr

    def to_dict(self) -> dict:
        return asdict(self)


def _power_fit(t: np.ndarray, frac: np.ndarray) -> list[float]:
    ok = frac > 0
    if ok.sum() == 0:
        return [0.0, 0.0, 0.0]
    lt, lf = np.log(t[ok]), np.log(frac[ok])
    zero_share = 1.0 - ok.mean()
    if ok.sum() >= 4 and np.ptp(lt) > 0.3:
        b, log_a = np.polyfit(lt, lf, 1)
    else:
        b, log_a = 0.0, float(lf.mean())
    resid = lf - (log_a + b * lt)
    # Zero-churn steps lower the mean; fold them in as a scale so the mean fraction is kept.
    scale = (1.0 - zero_share) * float(np.mean(np.exp(resid)))
    return [float(np.exp(log_a) * scale), float(b), float(resid.std())]


def fit(trace: Trace) -> TraceProfile:
    """Fit churn, attention-mass and DDR-cover statistics on a captured trace."""
    steps = trace.steps
    if steps.empty:
        raise TiersimError("cannot fit a synthetic profile on an empty trace")
    policy = TierConfig.from_dict(trace.meta["policy"])
    retier = steps[(steps["step"] % policy.retier_every == 0) & (steps["step"] > 0)]
    t = retier["context_len"].to_numpy(float)
    swaps = {
        "hbm_ddr": np.minimum(retier["hbm_to_ddr"], retier["ddr_to_hbm"]).to_numpy(float),
        "compressed": retier["from_compressed"].to_numpy(float),
    }
    churn = {name: _power_fit(t, s / t) if len(t) else [0.0, 0.0, 0.0] for name, s in swaps.items()}
    decode = steps[steps["step"] > 0]
    mass_rho, cover = [], []
    for _, rows in decode.groupby("layer", sort=True):
        ctx = rows["context_len"].to_numpy(float)
        per_tier = []
        for mass_col, n_col in (("mass_hbm", "n_hbm"), ("mass_ddr", "n_ddr"), ("mass_compressed", "n_compressed")):
            share = rows[n_col].to_numpy(float) / ctx
            mass = rows[mass_col].to_numpy(float)
            ok = (share > 0) & (mass > 0)
            if ok.any():
                lr = np.log(mass[ok] / share[ok])
                per_tier.append([float(lr.mean()), float(lr.std())])
            else:
                per_tier.append([0.0, 0.0])
        mass_rho.append(per_tier)
        n_ddr = rows["n_ddr"].to_numpy(float)
        has = n_ddr > 0
        if has.any():
            c90 = rows["ddr_cover90"].to_numpy(float)[has] / n_ddr[has]
            c99 = rows["ddr_cover99"].to_numpy(float)[has] / n_ddr[has]
            cover.append([float(c90.mean()), float(c90.std()), float(c99.mean()), float(c99.std())])
        else:
            cover.append([0.0, 0.0, 0.0, 0.0])
    prompt_len = float(np.mean([s["prompt_len"] for s in trace.meta["sequences"]]))
    return TraceProfile(trace.meta["policy"], trace.meta["model"], prompt_len, churn, mass_rho, cover)


def synthesize_sequence(profile: TraceProfile, prompt_len: int, new_tokens: int, num_layers: int,
                        rng: np.random.Generator, seq_id: int = 0) -> pd.DataFrame:
    """One synthetic sequence: rows for steps 0..new_tokens-1 and every layer."""
    cfg = TierConfig.from_dict(profile.policy)
    steps = np.arange(new_tokens)
    t = prompt_len + steps  # context after this step's token(s): prefill = prompt, then +1 per step
    t = t.astype(float)
    last_retier = steps - steps % cfg.retier_every
    t_at = prompt_len + last_retier
    tg = tier_targets_array(cfg, t_at.astype(float))
    n_hbm = tg["hbm"] + (steps - last_retier)
    is_retier = steps % cfg.retier_every == 0
    prev = {k: np.concatenate(([0.0], v[:-1])) for k, v in tg.items()}
    frames = []
    src_layers = len(profile.mass_rho)
    for layer in range(num_layers):
        src = min(int(layer * src_layers / max(num_layers, 1)), src_layers - 1)
        row = {
            "seq_id": np.full(new_tokens, seq_id),
            "step": steps,
            "layer": np.full(new_tokens, layer),
            "context_len": t,
            "n_hbm": n_hbm,
            "n_ddr": tg["ddr"],
            "n_compressed": tg["compressed"],
            "n_evicted": tg["evicted"],
        }
        d_ddr = np.where(is_retier, tg["ddr"] - prev["ddr"], 0)
        d_comp = np.where(is_retier, tg["compressed"] - prev["compressed"], 0)
        newly_evicted = np.where(is_retier, tg["evicted"] - prev["evicted"], 0)
        a, b, s = profile.churn["hbm_ddr"]
        swap = np.where(is_retier & (steps > 0), a * t**b * np.exp(rng.normal(0, s, new_tokens)) * t, 0)
        swap = np.minimum(np.round(swap), prev["ddr"])
        a, b, s = profile.churn["compressed"]
        swap_c = np.where(is_retier & (steps > 0), a * t**b * np.exp(rng.normal(0, s, new_tokens)) * t, 0)
        swap_c = np.minimum(np.round(swap_c), prev["compressed"])
        row["hbm_to_ddr"] = np.maximum(d_ddr, 0) + swap
        row["ddr_to_hbm"] = np.maximum(-d_ddr, 0) + swap
        row["to_compressed"] = np.maximum(d_comp, 0) + swap_c
        row["from_compressed"] = swap_c
        row["newly_evicted"] = newly_evicted
        shares = np.stack((n_hbm, tg["ddr"], tg["compressed"])) / t
        rho = np.stack(
            [np.exp(rng.normal(m, sd, new_tokens)) for m, sd in profile.mass_rho[src]]
        )
        raw = shares * rho
        mass = raw / np.maximum(raw.sum(axis=0), 1e-12)
        row["mass_hbm"], row["mass_ddr"], row["mass_compressed"] = mass
        c90m, c90s, c99m, c99s = profile.cover[src]
        n_ddr = tg["ddr"]
        c90 = np.clip(rng.normal(c90m, c90s, new_tokens), 0, 1) * n_ddr
        c99 = np.clip(rng.normal(c99m, c99s, new_tokens), 0, 1) * n_ddr
        row["ddr_cover90"] = np.minimum(np.ceil(c90), n_ddr)
        row["ddr_cover99"] = np.minimum(np.maximum(np.ceil(c99), row["ddr_cover90"]), n_ddr)
        frames.append(pd.DataFrame(row))
    return pd.concat(frames, ignore_index=True)


#: Peak bytes per trace row while synthesizing: the per-layer arrays, their frames, the concatenation
#: and the final cast (measured: 353 B/row for 2.4M rows of the bundled profile; 18 columns of 8 bytes
#: held about three times over), rounded up.
BYTES_PER_ROW = 400


def check_fits(rows: float, options: str) -> None:
    """Refuse a trace of ``rows`` rows that would not fit in half the memory available now (one line
    naming the options to lower), before any of it is allocated."""
    budget = available_memory() // 2
    need = rows * BYTES_PER_ROW
    if need > budget:
        raise TiersimError(f"synth would build {rows:,.0f} trace rows (~{need / 1e9:,.1f} GB), more than half of the "
                           f"{2 * budget / 1e9:.1f} GB this machine has available: lower {options}")


def synthesize(profile: TraceProfile, n: int, mean_length: float, sigma: float = 0.35,
               num_layers: int | None = None, seed: int = 0, model: dict | None = None) -> Trace:
    """``n`` sequences with log-normal generated lengths around ``mean_length`` tokens."""
    if n < 1:
        raise TiersimError(f"--n must be >= 1, got {n}")
    if not (np.isfinite(sigma) and 0 <= sigma <= MAX_SIGMA):
        raise TiersimError(f"--sigma must be 0..{MAX_SIGMA:g}, got {sigma}")
    if not (np.isfinite(mean_length) and mean_length >= 1):
        raise TiersimError(f"--lengths: mean length must be a finite number >= 1, got {mean_length}")
    num_layers = num_layers or int(profile.model["num_layers"])
    check_fits(n * mean_length * num_layers, "--n, --lengths or --layers")  # before drawing n lengths
    rng = np.random.default_rng(seed)
    mu = np.log(mean_length) - sigma**2 / 2
    lengths = np.maximum(np.round(rng.lognormal(mu, sigma, n)), 2).astype(int)
    check_fits(float(lengths.sum()) * num_layers, "--n, --lengths, --layers or --sigma")  # the lengths drawn
    prompt_len = max(int(round(profile.prompt_len)), 1)
    frames, sequences = [], []
    for seq_id, length in enumerate(lengths):
        frames.append(synthesize_sequence(profile, prompt_len, int(length), num_layers, rng, seq_id))
        sequences.append({"seq_id": seq_id, "prompt_id": f"synthetic-{seq_id}", "prompt_len": prompt_len,
                          "new_tokens": int(length), "text": ""})
    model_info = dict(model or profile.model)
    model_info["num_layers"] = num_layers
    meta = new_meta(model_info, profile.policy, sequences, device="synthetic", synthetic={
        "mean_length": mean_length, "sigma": sigma, "seed": seed, "profile": profile.to_dict()})
    steps = pd.concat(frames, ignore_index=True).astype(COLUMNS)[list(COLUMNS)]
    return Trace(meta=meta, steps=steps)
