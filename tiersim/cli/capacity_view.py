"""How ``simulate`` and ``capacity`` results read in a terminal: their tables and closing lines (render only).

The commands (``cmd_simulate``) parse the options, call the simulator and hand the result here; nothing
here computes a number. The strategies' labels, short names, splits and caveats are the registry's
(``tiersim.hierarchy.strategies``).
"""

from __future__ import annotations

from rich.table import Table

from tiersim.cli.app import add_columns, compact_table, console
from tiersim.hierarchy import strategies


def print_capacity(result: dict, scenario) -> None:
    answer = {**result["planner"], "points": result["points"]}
    console.print(f"[bold]{result['recommendation']}[/]", highlight=False, soft_wrap=True)  # one line: | head -1
    console.print(f"{result['model']} on {result['gpu']}, {workload_words(scenario)}\n({result['trace']} trace; "
                  "ctx: tokens held per sequence, mean / peak over the simulated steps)", highlight=False)
    console.print(_strategy_table(answer, f"Best point per strategy{_slo_words(answer)} "
                                          f"(closed form, {answer['steps']} steps each)"))
    if len(answer["batches"]) > 1:
        console.print(_batch_table(answer))
    else:
        rows = result["rows"]
        engine = rows[0].get("method", "SimPy") if rows else "SimPy"  # the engine the rows say they used
        console.print(rows_table(rows, f"Prefetch grid at batch {result['batch']} ({engine}; {_context_words(rows[0])})"))
        console.print(_sweep_table(result["batch_sweep"]))
    console.print(f"compute model: {(result.get('baseline') or {}).get('compute_model', 'roofline')}", highlight=False,
                  markup=False)
    base = result["baseline"]
    caveats = strategies.caveats(answer["strategies"])
    if caveats:
        console.print(f"* approximate, never recommended: {caveats}.", highlight=False)
    if base and not base["fits"]:
        console.print(f"[yellow]note:[/] the all-in-HBM baseline needs {base['peak_hbm_gb']:.1f} GB at batch "
                      f"{base['batch']} and [red]does NOT fit[/] in {base['hbm_capacity_gb']:.0f} GB; overheads are "
                      "against it anyway.", highlight=False)
    workload = "lockstep batch" if scenario.context is not None else "staggered batch"
    console.print(f"Largest batch with the full cache: {result['max_batch_full_cache']:,} (peak HBM over "
                  f"{answer['steps']} steps of the {workload}).", highlight=False)
    budget = result["max_overhead_pct"]
    if len(answer["batches"]) == 1:
        for label, best in (("Most HBM freed", result["best"]), ("Most freed, lossless", result.get("best_lossless"))):
            if best:
                console.print(f"{label} within {budget:g}% overhead: {best['hbm']:.2f}/{best['ddr']:.2f}/"
                              f"{best['evict']:.2f} saves {best['hbm_saved_gb']:.1f} GB at {best['overhead_pct']:+.1f}% "
                              f"(largest batch {best['max_batch']}).", highlight=False)
            else:
                console.print(f"{label}: no prefetch config saves HBM within {budget:g}% overhead at this batch.",
                              highlight=False)


def rows_table(rows: list[dict], title: str) -> Table:
    table = compact_table(title)
    # The staging buffers and every other field are in --format json / --out.
    add_columns(table, ("hbm/ddr/cmp/evict", "KV GB", "saved", "peak GB", "fits", "step ms", "stall ms",
                        "overhead", "tok/s", "max B"), optional=("KV GB", "max B", "peak GB", "stall ms"))
    for r in rows:
        table.add_row(
            "/".join(f"{r[k]:.2f}" for k in ("hbm", "ddr", "compressed", "evict")),
            f"{r['kv_full_gb']:.1f}→{r['kv_hbm_gb']:.1f}", f"{r['hbm_saved_gb']:.1f}",
            f"{r['peak_hbm_gb']:.1f}", _fits_cell(r), f"{r['step_ms']:.1f}",
            f"{r['stall_ms']:.1f}", f"{r['overhead_pct']:+.1f}%", f"{r['tokens_per_s']:,.0f}",
            "" if r.get("max_batch") is None else str(r["max_batch"]),
        )
    return table


def _fits_cell(row: dict) -> str:
    if row["fits"]:
        return "[green]yes[/]"
    return "[red]host[/]" if row.get("hbm_fits", False) else "[red]no[/]"


def _context_words(row: dict) -> str:
    return (f"{row['steps']} steps; context per sequence mean {row['context_tokens_mean']:,.0f} / "
            f"peak {row['context_tokens_peak']:,.0f} tokens")


def _strategy_label(r: dict) -> str:
    """The registry's label, ``*`` when approximate, and the split where the registry shows it."""
    if r["strategy"] == strategies.NO_OFFLOAD:
        return "full cache" if r["evict"] == 0 else "evict only"
    spec = strategies.get(r["strategy"])
    name = spec.label + ("*" if r["approximate"] else "")
    if spec.share_words is not None:
        name += f" ({r['share']:.0%}{' ' + spec.share_words if spec.share_words else ''})"
    return name


def _strategy_table(answer: dict, title: str) -> Table:
    """Per strategy its best point (most tok/s within the SLO, else the quickest that fits)."""
    table = compact_table(title)
    add_columns(table, ("strategy", "batch", "HBM/DDR/ev", "TPOT ms", "tok/s", "freed GB", "peak GB", "SLO",
                        "ctx mean/peak"), optional=("ctx mean/peak", "peak GB", "freed GB"))
    table.columns[2].justify = "left"
    rows = []
    if answer["full_cache"]:
        rows.append(("full @ largest", answer["full_cache"]))
    rows += [(_strategy_label(r), r) for r in answer["best_per_strategy"].values()]
    slo = answer["tpot_slo_ms"]
    for label, r in rows:
        ok = "-" if slo is None else ("[green]yes[/]" if r["within_slo"] else "[red]no[/]")
        table.add_row(label, f"{r['batch']:,}", f"{r['hbm']:.2f}/{r['ddr']:.2f}/{r['evict']:.2f}",
                      f"{r['tpot_ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['hbm_saved_gb']:.1f}",
                      f"{r['peak_hbm_gb']:.1f}", ok, f"{r['context_tokens_mean']:,.0f}/{r['context_tokens_peak']:,.0f}")
    return table


def _batch_table(answer: dict) -> Table:
    """Per batch and strategy: the most tok/s (TPOT ms) among the splits that fit and meet the SLO."""
    NO_OFFLOAD = strategies.NO_OFFLOAD
    names = [NO_OFFLOAD, *answer["strategies"]]
    table = compact_table(f"Per batch: best tok/s / TPOT ms that fits{_slo_words(answer)} (red: over the SLO); "
                          f"{answer['steps']} steps each, closed form")
    add_columns(table, ["batch", *("full/ev" if name == NO_OFFLOAD else strategies.get(name).short for name in names),
                        "ctx mean/peak"], left=0)
    max_evict = answer["max_evict"]
    for batch in answer["batches"]:
        mine = [r for r in answer["points"] if r["batch"] == batch and r["evict"] <= max_evict + 1e-9]
        cells = []
        for name in names:
            fit = [r for r in mine if r["strategy"] == name and r["fits"]]
            ok = [r for r in fit if r["within_slo"]]
            if ok:
                r = max(ok, key=lambda x: x["tokens_per_s"])
                cells.append(f"{r['tokens_per_s']:,.0f}/{r['tpot_ms']:.0f}")
            elif fit:
                r = min(fit, key=lambda x: x["tpot_ms"])
                cells.append(f"[red]{r['tokens_per_s']:,.0f}/{r['tpot_ms']:.0f}[/]")
            else:
                cells.append("[dim]no fit[/]")
        table.add_row(f"{batch:,}", *cells, f"{mine[0]['context_tokens_mean']:,.0f}/{mine[0]['context_tokens_peak']:,.0f}")
    return table


def _slo_words(answer: dict) -> str:
    return f" within {answer['tpot_slo_ms']:g} ms" if answer["tpot_slo_ms"] is not None else ""


def _sweep_table(sweep: list[dict]) -> Table:
    """Overhead and savings of the lossless configs per batch size: where the link starts to bind."""
    hbms = sorted({r["hbm"] for r in sweep}, reverse=True)
    steps = sweep[0]["steps"] if sweep else 0
    engines = sorted({r.get("method", "closed form") for r in sweep} - {"closed form"})
    at_batch = f"; the grid's {', '.join(engines)} rows at its batch" if engines else ""
    table = compact_table(f"Prefetch batch sweep, no eviction: overhead / HBM saved GB (✗: does not fit; {steps} "
                          f"steps each; closed form{at_batch})")
    add_columns(table, ["batch", *(f"hbm {h:.2f}" for h in hbms), "ctx mean/peak"], left=0)
    for batch in sorted({r["batch"] for r in sweep}):
        cells = []
        mine = [x for x in sweep if x["batch"] == batch]
        for h in hbms:
            r = next(x for x in mine if x["hbm"] == h)
            cell = f"{r['overhead_pct']:+.0f}% / {r['hbm_saved_gb']:.1f}"
            cells.append(cell if r["fits"] else f"[red]{cell} ✗[/]")
        table.add_row(str(batch), *cells, f"{mine[0]['context_tokens_mean']:,.0f}/{mine[0]['context_tokens_peak']:,.0f}")
    return table


def workload_words(scenario) -> str:
    words = (f"lockstep from {scenario.context:,} context tokens" if scenario.context is not None
             else f"~{scenario.mean_length:,.0f} generated tokens per sequence (staggered: each slot mid-sequence)")
    if scenario.prefetch != "all":
        words += f", {scenario.prefetch} prefetch ({scenario.prefetch_share():.0%} of DDR, not exact)"
    return words
