"""The calibrated simulator's prediction for each measured validation point.

Split out of calibrate.py (which runs and records the measurement) because predicting is the simulator's
closed form, not measuring; the graph executor's run (graph_run) and the decode grid share it. Imports
only numpy and the numpy-only parts of ``tiersim.simulator``, so the GPU machine can run it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tiersim.errors import TiersimError

if TYPE_CHECKING:
    from tiersim.validator.calibrate import ValidationPoint


def sim_model(shape, params: float):
    """The simulator's Model for ``shape``, with the built model's exact parameter count."""
    from tiersim.simulator.presets import Model

    return Model(shape.name, shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.hidden_size,
                 shape.num_attention_heads, float(params), vocab_size=shape.vocab_size,
                 tie_word_embeddings=shape.tie_word_embeddings)


def effective_context(context: int, warmup: int, steps: int) -> float:
    """Mean context during the timed steps (the cache grows one token per step)."""
    return context + warmup + steps / 2


def layer_bytes(model, batch: int, context: float) -> float:
    """Bytes one decoder layer reads per all-in-HBM decode step, by the simulator's own accounting
    (the step's weight reads, LM head included and embedding table excluded, spread over the layers)."""
    return model.step_weight_bytes(batch) / model.num_layers + batch * context * model.kv_bytes_per_token_layer


def predict(model, gpu, policy: dict, batch: int, context: float, hbm: float, table=None,
            compressed: float = 0.0) -> dict:
    """The simulator's closed-form step time and stall for one steady (non re-tiering) decode step; of what is
    not in HBM, ``compressed`` is in the compressed tier, the rest in DDR (``policy`` may name a TierConfig
    ``strategy`` and ``fetch_share``: then that strategy's costs)."""
    from tiersim.hierarchy.config import TierConfig, tier_targets_array
    from tiersim.simulator.analytic import Offload, Workload, closed_form, layer_costs

    pol = Offload(TierConfig(hbm=hbm, ddr=1.0 - hbm - compressed, compressed=compressed, **policy))
    tg = tier_targets_array(pol.tiers, np.array([float(context)]))
    one = np.array([float(batch * context)])
    work = Workload(batch=batch, steps=np.array([0]), context=one, full_context=one,
                    hbm=tg["hbm"] * batch, ddr=tg["ddr"] * batch, compressed=tg["compressed"] * batch,
                    demoted=np.zeros(1))
    strategy = pol.tiers.strategy
    if strategy == "prefetch":
        costs = layer_costs(model, gpu, pol, work, table)
    else:  # the graph executor's host-attention / hybrid points: the strategy's own costs (hybrid at its share)
        from tiersim.simulator.strategies import measured_share, step_costs

        costs = step_costs(strategy, model, gpu, pol, work, table=table,
                           share=measured_share(strategy, pol.tiers.fetch_share))
    step, stall = closed_form(costs, model.num_layers)
    return {"step_ms": float(step[0]) * 1e3, "stall_ms": float(stall[0]) * 1e3}


def tier_options(options: dict) -> dict:
    """``options`` (a TierConfig's fields and a point's ``strategy`` / ``fetch_share``) as TierConfig takes them.

    Every graph-executor point records its ``fetch_share``, the share of the DDR tier its step fetched to the
    device (prefetch 1.0, host attention 0.0, hybrid its own: ``graph_tiers.fetched_share``), and it flows through
    unchanged up to here. TierConfig takes that knob only from the strategies that take a share (it refuses 0.0
    from host attention, whose split the strategy implies): ``strategies.own_share``, the rule ``simulate
    --against`` reads too, drops it for the others, and the strategy alone prices the point."""
    from tiersim.hierarchy.strategies import own_share

    if "fetch_share" in options and own_share(options.get("strategy"), options["fetch_share"]) is None:
        return {k: v for k, v in options.items() if k != "fetch_share"}
    return options


def add_predictions(doc: dict, points: list[ValidationPoint], model, policy: dict, settings: dict,
                    profile=None, per_point: list[dict] | None = None) -> None:
    """Fill each measured point's prediction from the simulator calibrated by ``doc`` (in place). ``per_point``:
    per point, what overrides ``policy`` for it (the graph executor's strategy check: a host strategy's point in
    a prefetch grid is predicted with that strategy's costs, as ``simulate --against`` simulates it)."""
    try:
        from tiersim.simulator.calibration import apply_calibration
        from tiersim.simulator.presets import get_gpu
    except ImportError:  # pragma: no cover - the simulator's numpy-only modules are part of tiersim
        return
    gpu = apply_calibration(get_gpu(doc["gpu_preset"]), doc)
    table, doc["compute_model"] = None, "roofline (calibrated)"
    if profile is not None:
        from tiersim.simulator.profile import check_device, load_profile, table_for

        prof = load_profile(profile)
        try:  # the same device by name (the smoke mode too), or one of the same preset
            if (prof.get("device") or {}).get("name") != (doc.get("device") or {}).get("name"):
                check_device(prof, doc["gpu_preset"])
            table, why = table_for(prof, model)
        except TiersimError as exc:  # never lose a finished measurement over the prediction
            table, why = None, f"roofline (calibrated; {exc})"
        doc["compute_model"] = table.describe() if table is not None else why
    for i, point in enumerate(points):
        if point.measured_step_ms is None:
            continue
        ctx = effective_context(point.context, settings["warmup"], settings["steps"])
        own = tier_options({**policy, **(per_point[i] if per_point else {})})
        pred = predict(model, gpu, own, point.batch, ctx, point.hbm, table, point.compressed)
        point.predicted(pred["step_ms"], pred["stall_ms"])
