"""`tiersim serve` (one workload through the serving simulator) and the engine of `tiersim capacity --qps`
(the highest request rate within the SLOs): tiersim.serving does the work, this module reads the options
and prints."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer

from tiersim.cli import options
from tiersim.cli.app import add_columns, app, compact_table, console, deliver, err_console, wrote
from tiersim.cli.groups import MAX_TOKENS, ComputeModel, Target
from tiersim.errors import TiersimError
from tiersim.hierarchy import strategies
from tiersim.options import option, parse_list

FORMATS = ("table", "json")
ON_FULL = ("preempt-recompute", "preempt-swap", "queue", "spill")  # tiersim.serving.memory.ON_FULL (tested equal)
ORACLE = "queue-oracle"  # tiersim.serving.memory.ORACLE (tested equal): by name only, never in "all"
SPILL_CAP = 0.05  # tiersim.serving.memory.SPILL_CAP (tested equal)
TP_SIZES = (1, 2, 4, 8)  # tiersim.simulator.parallel.TP_SIZES (tested equal)
MAX_REQUESTS = 10_000_000
QPS_MAX = 1e9  # requests/s: `serve --qps` and `capacity --qps` share this bound
# simulate / capacity's --engine-overhead, the same words and choices (tiersim.simulator.engines)
_ENGINE = next(f for f in dataclasses.fields(ComputeModel) if f.name == "engine_overhead").metadata


@dataclasses.dataclass(frozen=True)
class Serving:
    """The serving engine and its workload, beside the model and GPU (``serve`` and ``capacity --qps``)."""

    tp: int = option(1, "tensor-parallel GPUs of one node (weights and KV heads split; all-reduces per layer: 2, "
                        "1 for Falcon's parallel block)", choices=TP_SIZES)
    on_full: str = option("all", "when the next step's KV does not fit: all, or a comma list of all, " + ", ".join(ON_FULL)
                          + f" ({ORACLE}: queue reserving the true output lengths, an oracle, by name only)")
    requests: int = option(1000, "synthetic requests per run", min=1, max=MAX_REQUESTS)
    requests_file: Path | None = option(None, "replay these requests instead (CSV, JSON lines or Parquet with "
                                        "arrival_s, prompt_tokens, output_tokens; docs/file-formats.md)", input=True)
    prompt_lengths: str = option("256", "mean prompt tokens (log-normal): a number or a --lengths preset")
    sigma: float = option(0.35, "log-normal spread of prompt and output lengths (1: a long tail)", min=0, max=2)
    burstiness: float = option(1.0, "coefficient of variation of the gaps between arrivals (1: Poisson, above: "
                               "bursty gamma)", min=0.01, max=100)
    max_batch: int = option(256, "requests in the running batch at most (continuous batching)", min=1, max=1 << 16)
    token_budget: int = option(2048, "tokens per step: decode rows first, prefill chunks fill the rest "
                               "(chunked prefill)", min=1, max=MAX_TOKENS)
    spill_ddr: float = option(0.5, "spill: the tier split's DDR share of a request's context moved when HBM runs "
                              "out (the least-attended tokens; sinks and the recent window stay)", min=0.01, max=1)
    spill_cap: float = option(SPILL_CAP, "spill: the most reading spilled tokens may slow a step, as a share of the "
                              "same batch in HBM (the step model's price); past it spill preempts (recompute)",
                              min=0, max=1000)
    max_tokens: int | None = option(None, "output tokens each request may generate at most (outputs longer are cut, "
                                    "for every policy); queue reserves prompt + max_tokens (default: a request "
                                    "file's max_tokens column, else the power of two covering the longest output)",
                                    min=1, max=MAX_TOKENS)
    ttft_slo: float = option(2000.0, "SLO: p99 time to first token, ms", min=0.001)


def serving_only(serving: Serving) -> None:
    """One line when a serving option is given to `capacity` without --qps (it would be ignored)."""
    from tiersim.options import flag

    for field in dataclasses.fields(Serving):
        if getattr(serving, field.name) != field.default:
            raise TiersimError(f"{flag(field)} applies to capacity --qps (the serving search) only; add --qps or drop it")


def batch_only(given: dict[str, bool], *groups) -> None:
    """One line when a batch-planner option is given to `capacity --qps` (the serving search would ignore it):
    ``given`` flags set by hand, and every field of ``groups`` but --lengths, --seed and --engine-overhead (which
    the serving search takes) away from its default."""
    from tiersim.options import flag

    for group in groups:
        for field in dataclasses.fields(group):
            if field.name not in ("lengths", "seed", "engine_overhead") and getattr(group, field.name) != field.default:
                given = {**given, flag(field): True}
    for name, on in given.items():
        if on:
            raise TiersimError(f"{name.split('/')[0]} is the batch planner's; capacity --qps (the serving search) does "
                               "not use it: drop it, or drop --qps")


def policies(text: str) -> list[str]:
    names = [n for item in parse_list(text, str, "--on-full") for n in (ON_FULL if item == "all" else (item,))]
    bad = [n for n in names if n not in (*ON_FULL, ORACLE)]
    if bad:
        raise TiersimError(f"--on-full: unknown policy {bad[0]!r}; choose all or from {', '.join((*ON_FULL, ORACLE))}")
    return list(dict.fromkeys(names))


DEFAULT_TPOT_SLO = 50.0  # ms, p99
DEFAULT_QPS = 1.0  # serve's --qps


def ignored(serving: Serving, strategy: str, lengths: str | None, qps: float | None, names: list[str]) -> None:
    """One line when an option given would be silently ignored: a synthetic workload's options beside
    --requests-file (``qps`` None: capacity --qps, whose search sets the rate), or the spill-only --spill-ddr and
    --strategy without spill in --on-full. (A value equal to the default cannot be told from no option.)"""
    defaults = {f.name: f.default for f in dataclasses.fields(Serving)}
    if serving.requests_file is not None:
        given = [("--requests", serving.requests != defaults["requests"]), ("--lengths", lengths is not None),
                 ("--prompt-lengths", serving.prompt_lengths != defaults["prompt_lengths"]),
                 ("--sigma", serving.sigma != defaults["sigma"])]
        if qps is not None:  # serve: the file's arrival times are replayed as they are
            given += [("--qps", qps != DEFAULT_QPS), ("--burstiness", serving.burstiness != defaults["burstiness"])]
        for name, on in given:
            if on:
                raise TiersimError(f"{name} shapes synthetic requests; --requests-file replays its own: drop one")
    if "spill" not in names:
        spill_only = (("--spill-ddr", serving.spill_ddr != defaults["spill_ddr"]),
                      ("--spill-cap", serving.spill_cap != defaults["spill_cap"]), ("--strategy", strategy != "prefetch"))
        for name, on in spill_only:
            if on:
                raise TiersimError(f"{name} applies to spilled tokens only; add spill to --on-full or drop {name}")


def build(target: Target, serving: Serving, strategy: str, lengths: str | None, seed: int, qps: float | None,
          tpot_slo: float | None = None, engine_overhead: str = "none"):
    """(spec, requests, policies) from the options: every refusal is one line naming the option. The engine
    overhead reaches the GPU through ``engines.apply``, as for simulate / capacity (the step model reads it)."""
    from tiersim.hierarchy.config import TierConfig
    from tiersim.serving import memory, metrics, workload
    from tiersim.serving.engine import EngineConfig
    from tiersim.serving.run import ServeSpec
    from tiersim.shapes import check_context
    from tiersim.simulator import engines, parallel, presets
    from tiersim.simulator.scenario import assumed_link_note
    from tiersim.traces.lengths import parse_lengths

    if strategy not in strategies.NAMES:
        raise TiersimError(f"--strategy must be one of {', '.join(strategies.NAMES)}, got {strategy!r}")
    model = presets.model_from_config(target.model_config) if target.model_config else presets.get_model(target.model)
    gpu = engines.apply(presets.get_gpu(target.gpu), engine_overhead, model.num_layers)
    parallel.check_tp(model, serving.tp)
    if serving.tp > 1:  # refused here, before the link note, so a refusal stays one line
        parallel.link_line(gpu, serving.tp)
    names = policies(serving.on_full)
    ignored(serving, strategy, lengths, qps, names)
    # The context checks come before the cut's note, so a refusal stays one line.
    if serving.requests_file is not None:
        requests = workload.read_requests(serving.requests_file)
        _check_rows_context(model, requests, serving.max_tokens)
    else:
        output = parse_lengths(lengths or "math500")
        try:
            prompt = parse_lengths(serving.prompt_lengths)
        except TiersimError as exc:
            raise TiersimError(str(exc).replace("--lengths", "--prompt-lengths")) from None
        # The asked means, before the draw: a mean past the context asks for a workload the model cannot run.
        served = output if serving.max_tokens is None else min(output, serving.max_tokens)
        check_context(model.shape, prompt + served, f"--prompt-lengths {prompt:,.0f} + --lengths {served:,.0f}")
        requests = workload.synthetic(serving.requests, 1.0 if qps is None else qps, prompt, output, serving.sigma,
                                      serving.burstiness, seed)
    if serving.max_tokens is not None:
        requests, cut = workload.cut_outputs(requests, serving.max_tokens)
        if cut:
            err_console.print(f"[yellow]note:[/] --max-tokens {serving.max_tokens:,} cuts {cut:,} of {len(requests):,} "
                              "outputs (every policy serves them cut)", highlight=False, soft_wrap=True)
    if serving.requests_file is None:  # the draw's tail past the context: cut there, as an engine stops a request
        requests, cut, longest = workload.clip_to_context(requests, model.max_context)
        if cut:
            err_console.print(f"[yellow]note:[/] {cut:,} of {len(requests):,} drawn requests (prompt + output) run past "
                              f"{model.name}'s {model.max_context:,}-token context, the longest {longest:,} "
                              "tokens: each is cut at the context, as an engine stops a request there (every policy "
                              "serves them cut)", highlight=False, soft_wrap=True)
    # One max_tokens for all: --max-tokens, else the power of two covering the outputs; a file's own column wins.
    max_tokens = (None if requests.max_tokens is not None else
                  serving.max_tokens or memory.default_max_tokens(requests.output, model.max_context))
    tiers = TierConfig(hbm=1.0 - serving.spill_ddr, ddr=serving.spill_ddr)
    engine = EngineConfig(serving.max_batch, serving.token_budget, names[0], tiers, serving.spill_cap, max_tokens)
    tpot = DEFAULT_TPOT_SLO if tpot_slo is None else tpot_slo
    slo = metrics.SLO(serving.ttft_slo / 1e3, tpot / 1e3)
    if note := assumed_link_note(gpu, target.gpu):  # simulate / capacity's note (issue 22), once the options pass
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    return ServeSpec(model, gpu, serving.tp, strategy, engine, slo), requests, names


def _check_rows_context(model, requests, max_tokens: int | None) -> None:
    """One line when a replayed file's longest request (prompt + output, cut to --max-tokens) is longer than
    the model's context, naming its row."""
    import numpy as np

    from tiersim.shapes import check_context

    output = np.minimum(requests.output, np.inf if max_tokens is None else max_tokens)
    total = requests.prompt + output
    row = int(total.argmax())
    check_context(model.shape, float(total[row]), f"request {row} of --requests-file (prompt "
                  f"{requests.prompt[row]:,} + output {int(output[row]):,})")


@app.command()
@options.command(outputs={"out": (".parquet",), "save_requests": (".csv", ".jsonl", ".parquet"),
                          "report": (".html", ".htm")},
                 example=["--requests", "3", "--qps", "1", "--lengths", "8", "--prompt-lengths", "8",
                          "--on-full", "queue"])
def serve(
    target: Target = Target(),
    serving: Serving = Serving(),
    qps: float = options.opt(DEFAULT_QPS, "--qps", help="synthetic arrivals per second (not with --requests-file)",
                             min=1e-9, max=QPS_MAX),
    lengths: str = typer.Option(None, help="mean output tokens (log-normal): a number or gsm8k/math500/amc23/gpqa/"
                                "aime (default: math500)"),
    strategy: str = typer.Option("prefetch", help="how spilled DDR tokens reach attention: "
                                 + strategies.help_text()),
    seed: int = options.opt(0, help="seed of the arrivals and lengths", min=0, max=2**32 - 1),
    tpot_slo: float = options.tpot_slo(DEFAULT_TPOT_SLO, "SLO: p99 time per output token, ms"),
    engine_overhead: str = options.opt("none", "--engine-overhead", help=_ENGINE["help"],
                                       choices=_ENGINE["bounds"].choices),
    fmt: str = options.opt("table", "--format", help="table or json", choices=FORMATS),
    out: Path = typer.Option(None, help="per-request rows of every policy, an on_full column first (Parquet, kind 'serving')"),
    save_requests: Path = typer.Option(None, "--save-requests", help="write the requests replayed (CSV, JSON lines "
                                       "or Parquet), to replay with --requests-file"),
    report: Path = typer.Option(None, help="also write an HTML report of the first policy's run (its timeline)"),
) -> None:
    """Serve a request workload: TTFT, TPOT and E2E percentiles, goodput at the SLOs, preemptions and
    spilled GB, per --on-full policy on the same requests."""
    from tiersim.serving import run as serving_run
    from tiersim.serving import workload
    from tiersim.serving.memory import Unservable
    from tiersim.simulator.capacity import link_mark

    spec, requests, names = build(target, serving, strategy, lengths, seed, qps, tpot_slo, engine_overhead)
    results, refused = [], {}
    for name in names:
        try:
            results.append(serving_run.simulate(spec.with_policy(name), requests))
        except Unservable as exc:  # this policy can never hold a request: the others still answer
            refused[name] = str(exc)
    if not results:
        raise Unservable(next(iter(refused.values())))
    documents = [serving_run.document(r) for r in results]
    documents += [{"on_full": name, "unservable": why} for name, why in refused.items()]

    def html():
        from tiersim.cli.reports import write_report

        write_report([serving_run.frame_and_meta(results)], report, "serve")  # --out's table, not written

    writes = [(out, lambda: (serving_run.write(out, results), wrote(out))), (report, html),
              (save_requests, lambda: (workload.write_requests(save_requests, requests), wrote(save_requests)))]
    first = _first_line(spec, results)
    if fmt == "json":
        deliver({"recommendation": first, "gpu_link": link_mark(spec.gpu), "runs": documents}, writes)
        return
    console.print(f"[bold]{first}[/]", highlight=False, soft_wrap=True)
    console.print(f"{requests.describe()}; {_engine_words(spec)}", highlight=False)
    console.print(_runs_table(results))
    _notes(refused)
    deliver(None, writes)


def _notes(refused: dict[str, str]) -> None:
    """One note per reason: the policies that cannot serve the workload, and why."""
    for why in dict.fromkeys(refused.values()):
        names = [n for n, w in refused.items() if w == why]
        console.print(f"[yellow]note:[/] --on-full {', '.join(names)} cannot serve this workload: {why}", highlight=False)


def _engine_words(spec) -> str:
    e = spec.engine
    where = f"{spec.tp} x {spec.gpu.name}" if spec.tp > 1 else spec.gpu.name
    limit = "per request" if e.max_tokens is None else f"{e.max_tokens:,}"
    return (f"{spec.model.name} on {where}, max batch {e.max_batch}, {e.token_budget} tokens per step, max_tokens "
            f"{limit}, DDR read by {spec.strategy} (spill cap {e.spill_cap:.0%}), engine overhead {spec.gpu.engine}")


def _first_line(spec, results) -> str:
    slo = spec.slo
    ok = [r for r in results if r.summary["within_slo"]]
    limits = f"p99 TTFT {slo.ttft_s * 1e3:g} ms / TPOT {slo.tpot_s * 1e3:g} ms"
    if not ok:
        best = max(results, key=lambda r: r.summary["goodput_qps"])
        return (f"No --on-full policy meets {limits} at this load; the most goodput is {best.spec.engine.on_full}'s "
                f"{best.summary['goodput_qps']:.3g} requests/s.")
    top = max(r.summary["goodput_qps"] for r in ok)
    best = [r.spec.engine.on_full for r in ok if r.summary["goodput_qps"] == top]
    return (f"{' = '.join(best)} {'meets' if len(best) == 1 else 'meet'} {limits} with {top:.3g} requests/s of "
            f"goodput ({len(ok)} of {len(results)} policies meet it).")


def _defined(value, spec: str) -> str:
    """A percentile, or n/a where none is defined (TPOT when every request wrote one token: NaN, null in JSON)."""
    return "n/a" if value is None or value != value else format(value, spec)


def _runs_table(results):
    table = compact_table("Per --on-full policy, the same requests (latencies in ms; goodput: requests/s within both SLOs)")
    add_columns(table, ("on-full", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "E2E p99 s", "queue p99",
                        "goodput", "tok/s/GPU", "batch", "preempt", "spill GB", "SLO"),
                optional=("queue p99", "batch", "E2E p99 s", "TTFT p50", "TPOT p50"))
    for r in results:
        s = r.summary
        table.add_row(r.spec.engine.on_full, f"{s['ttft_ms']['p50']:,.0f}", f"{s['ttft_ms']['p99']:,.0f}",
                      _defined(s['tpot_ms']['p50'], ".1f"), _defined(s['tpot_ms']['p99'], ".1f"),
                      f"{s['e2e_ms']['p99'] / 1e3:,.1f}",
                      f"{s['queue_ms']['p99']:,.0f}", f"{s['goodput_qps']:.3g}", f"{s['tokens_per_s_per_gpu']:,.0f}",
                      f"{s['mean_batch']:.0f}", f"{s['preemptions']:,}", f"{s['spilled_gb']:.1f}",
                      "[green]yes[/]" if s["within_slo"] else "[red]no[/]")
    return table


def parse_qps_range(text: str) -> tuple[float, float]:
    """'0.5..20' -> (0.5, 20); '20' -> (20 / 64, 20): the search's bracket."""
    import math

    parts = text.split("..")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise TiersimError(f"--qps: expected a rate or a range LO..HI (requests/s), got {text!r}") from None
    if len(values) == 1:
        values = [values[0] / 64, values[0]]
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values) or values[0] >= values[1]:
        raise TiersimError(f"--qps: expected a rate > 0 or a range LO..HI with 0 < LO < HI, got {text!r}")
    if values[1] > QPS_MAX:  # the same bound as serve's --qps
        raise TiersimError(f"--qps: at most {QPS_MAX:g} requests/s, got {text!r}")
    return values[0], values[1]


def capacity_qps(qps: str, target: Target, serving: Serving, strategy: str, lengths: str | None, seed: int,
                 tpot_slo: float | None, fmt: str, out: Path | None, report: Path | None,
                 engine_overhead: str = "none") -> None:
    """`tiersim capacity --qps`: per --on-full policy the highest rate within the SLOs (bisection)."""
    from tiersim.cli.progress import meter
    from tiersim.fileformat import SERVING_CAPACITY, header, write_document
    from tiersim.serving import search
    from tiersim.simulator.capacity import link_mark

    lo, hi = parse_qps_range(qps)
    strategy = "prefetch" if strategy == "all" else strategy
    spec, requests, names = build(target, serving, strategy, lengths, seed, None, tpot_slo, engine_overhead)
    if serving.requests_file is None:  # the search sets the rate: the lengths are what the workload says
        kind = "Poisson" if serving.burstiness == 1 else f"gamma CV {serving.burstiness:g}"
        requests = dataclasses.replace(requests, source=f"{kind} arrivals")
    bracket = search.Bracket(lo, hi)
    answers = {}
    with meter("searching QPS", search.points_needed(bracket) * len(names), eta=True, transient=True) as progress:
        for name in names:
            answers[name] = search.max_qps(spec.with_policy(name), requests, bracket, serving.burstiness, seed,
                                           tick=progress.advance)
    first = search.recommend(spec, answers)
    document = {**header(SERVING_CAPACITY), "recommendation": first, **spec.describe(),
                "gpu_link": link_mark(spec.gpu), "workload": requests.describe(), "qps_range": [lo, hi],
                "policies": answers,
                "points": [{**p, "on_full": name} for name, a in answers.items() for p in a["points"]]}
    document.pop("on_full"), document.pop("oracle")  # per policy (the policies' names say which is the oracle)

    from tiersim.cli.reports import write_report

    writes = [(out, lambda: (write_document(out, document), wrote(out))),
              (report, lambda: write_report([document], report, "capacity"))]
    if fmt == "json":
        deliver(document, writes)
        return
    console.print(f"[bold]{first}[/]", highlight=False, soft_wrap=True)
    console.print(f"{requests.describe()}; {_engine_words(spec)}", highlight=False)
    table = compact_table(f"Highest QPS within the SLOs per --on-full policy (bisection in {lo:g}..{hi:g}/s, "
                          "each point a fixed-seed run)")
    add_columns(table, ("on-full", "max QPS", "TTFT p99 ms", "TPOT p99 ms", "goodput", "tok/s/GPU", "runs"))
    for name, a in answers.items():
        best = max((p for p in a["points"] if p["within_slo"]), key=lambda p: p["qps"], default=None)
        cells = ("-",) * 4 if best is None else (f"{best['ttft_p99_ms']:,.0f}", _defined(best['tpot_p99_ms'], ".1f"),
                                                 f"{best['goodput_qps']:.3g}", f"{best['tokens_per_s_per_gpu']:,.0f}")
        table.add_row(name, "cannot" if "unservable" in a else search.rate_words(a), *cells, str(len(a["points"])))
    console.print(table)
    _notes({name: a["unservable"] for name, a in answers.items() if "unservable" in a})
    deliver(None, writes)
