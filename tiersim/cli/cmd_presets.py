"""`tiersim presets`: the GPU and model presets the simulator knows."""

from __future__ import annotations

import dataclasses

from tiersim.atomic import dumps
from tiersim.cli import options
from tiersim.cli.app import add_columns, app, compact_table, console


@app.command()
@options.command(example=[])
def presets(fmt: str = options.opt("table", "--format", help="table or json", choices=("table", "json"))) -> None:
    """List GPU and model presets (any transformers config.json also works via --model-config)."""
    from tiersim.errors import TiersimError
    from tiersim.simulator import engines
    from tiersim.simulator.presets import GB, GPUS, MODELS

    if fmt == "json":
        print(dumps({"gpus": {k: g.to_dict() for k, g in GPUS.items()},
                     "models": {k: {**m.to_dict(), "max_context": m.max_context} for k, m in MODELS.items()},
                     "engines": {k: dataclasses.asdict(e) for k, e in engines.presets().items()}}, indent=2))
        return
    if fmt != "table":
        raise TiersimError(f"--format must be table or json, got {fmt!r}")
    gpus = compact_table("GPU presets (link figures in GB/s)")
    add_columns(gpus, ("name", "HBM GB", "HBM TB/s", "H2D", "D2H", "both", "link", "copy µs", "TFLOP/s", "host GB",
                       "note"), optional=("note", "host GB", "copy µs", "both"))
    gpus.columns[-1].justify = "left"
    for g in GPUS.values():
        gpus.add_row(g.name, f"{g.hbm_bytes / GB:.0f}", f"{g.hbm_bw / 1e12:.2f}", f"{g.h2d_bw / GB:.0f}",
                     f"{g.d2h_bw / GB:.0f}", f"{g.bidir_bw / GB:.0f}", "ASSUMED" if g.link_assumed else "measured",
                     f"{g.copy_latency * 1e6:.0f}",
                     f"{g.peak_flops / 1e12:.0f}", f"{g.host_bytes / GB:.0f}", g.note)
    models = compact_table("Model presets")
    add_columns(models, ("name", "layers", "KV heads", "head dim", "hidden", "params (B)", "vocab",
                         "KV bytes/token (bf16)", "context"))
    for m in MODELS.values():
        models.add_row(m.name, str(m.num_layers), str(m.num_kv_heads), str(m.head_dim), str(m.hidden_size),
                       f"{m.params / 1e9:.2f}", f"{m.vocab_size:,}", f"{m.kv_bytes_per_token:,.0f}",
                       "-" if m.max_context is None else f"{m.max_context:,}")
    engine_table = compact_table("Engine presets (--engine-overhead: the serving engine's own per-step work)")
    add_columns(engine_table, ("name", "per step ms", "per sequence ms", "floor ms/layer", "role", "measured on",
                               "source"), optional=("source", "measured on"))
    for e in engines.presets().values():
        engine_table.add_row(e.name, f"{e.fixed_s * 1e3:.3g}", f"{e.per_sequence_s * 1e3:.3g}",
                             f"{e.floor_per_layer_s * 1e3:.3g}", e.role, e.measured_on or "-", e.source or "-")
    # An engine's own decode-attention kernel, per GPU it was fitted on (trtllm's only charges): the read rate per thread
    # block of a kernel that does not split the KV, and the share of a GQA group's repeated KV reads reaching HBM.
    blocks = compact_table("Decode attention kernel (--engine-overhead: a kernel that does not split the KV, and "
                           "re-reads a GQA model's KV per query head beyond L2)")
    add_columns(blocks, ("engine", "GPU preset", "GB/s per block", "GQA re-read share"))
    for e in engines.presets().values():
        rates, shares = dict(e.attn_block_bw), dict(e.kv_reread_share)
        for gpu in sorted(set(rates) | set(shares)):
            blocks.add_row(e.name, gpu, f"{rates[gpu] / 1e9:.2f}" if gpu in rates else "-",
                           f"{shares[gpu]:.2f}" if gpu in shares else "-")
    console.print(gpus)
    console.print(models)
    console.print(engine_table)
    if blocks.row_count:
        console.print(blocks)
