"""Run the quality grid: the full cache once per prompt, then every cell, each scored against it.

A cell is one policy configuration: the hierarchy at an (HBM ratio, eviction ratio, compressed
ratio) point, or an eviction baseline whose budget is an HBM ratio of the grid (like for like:
a baseline keeps in HBM everything it keeps). Decoding is greedy, so the full cache's output is
the reference every cell is measured against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from tiersim.errors import ConfigError
from tiersim.hierarchy import strategies as registry
from tiersim.hierarchy.config import TierConfig
from tiersim.quality import metrics

HIERARCHY = "hierarchy"
FULL_CACHE = "full"


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid.

    ``hbm`` is the grid coordinate asked for; ``config.hbm`` may be lower when the eviction and
    compressed ratios leave less than that (hbm 1.0 with 3% evicted keeps 97% in HBM, none in DDR).
    """

    method: str
    hbm: float
    config: TierConfig
    press: object | None = None  # a kvpress press (tiersim.quality.presses.PressSpec) instead of the TieredCache

    @property
    def label(self) -> str:
        c = self.config
        if self.method == HIERARCHY or self.method.startswith(HIERARCHY + "/"):
            text = f"hbm {self.hbm:g} evict {c.evict:g}"
            text += f" comp {c.compressed:g}" if c.compressed else ""
            return text if self.method == HIERARCHY else f"{self.method[len(HIERARCHY) + 1:]} {text}"
        return f"{self.method} hbm {self.hbm:g}"


@dataclass(frozen=True)
class Sample:
    """One tokenized prompt: input ids [1, L] and its ground-truth answer, if any."""

    id: str
    input_ids: object  # torch.Tensor; typed loosely so this module imports without torch
    answer: str | None = None


@dataclass
class Run:
    """One generation: a sample under the full cache or a cell."""

    sample_id: str
    method: str
    cell: Cell | None
    token_ids: list[int]
    text: str
    answer: str | None
    seconds: float
    tier_counts: dict = field(default_factory=dict)  # layer 0 at the end (TieredCache only)
    resumed: bool = False  # read back from the journal, not generated now

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / max(self.seconds, 1e-9)


def _unique(values: Iterable) -> list:
    return list(dict.fromkeys(values))  # order kept, repeats dropped


def _checked(values: Iterable[float], name: str, ok: Callable[[float], bool], allowed: str) -> list[float]:
    """Deduplicated ratios, each inside its allowed range (NaN never is)."""
    checked = []
    for value in _unique(values):
        if value != value or not ok(value):
            raise ConfigError(f"--{name}: each value must be in {allowed}, got {value!r}")
        checked.append(float(value))
    return checked


def build_cells(
    hbm: Sequence[float],
    evict: Sequence[float],
    compressed: Sequence[float] = (0.0,),
    baselines: Sequence[str] = (),
    strategies: Sequence[str] = ("prefetch",),
    presses: Sequence = (),
    **options,
) -> list[Cell]:
    """The hierarchy's cells (every hbm x compressed x evict), each baseline at every hbm < 1, then each
    kvpress press (``presses``: :class:`tiersim.quality.presses.PressSpec`) at every hbm < 1, pruning the rest.

    ``strategies``: the hierarchy's cells run the first; every further strategy adds a copy of the
    cells that hold DDR tokens, as method ``hierarchy/<strategy>``, so the grid shows what each
    strategy costs in fidelity against the full cache (``fetch_share`` in ``options`` applies to them).

    DDR takes what HBM, compressed and evicted leave; when they leave less than the HBM ratio
    asked for, HBM shrinks instead (nothing in DDR). ``options`` are further TierConfig fields
    (sink_tokens, recent_window, retier_every, compressed_bits, ...), the same for every cell.
    """
    from tiersim.hierarchy.baselines import BASELINES

    hbm = _checked(hbm, "hbm", lambda v: 0.0 < v <= 1.0, "(0, 1]")
    evict = _checked(evict, "evict", lambda v: 0.0 <= v < 1.0, "[0, 1)")
    compressed = _checked(compressed, "compressed", lambda v: 0.0 <= v < 1.0, "[0, 1)")
    for name in baselines:
        if name not in BASELINES:
            raise ConfigError(f"--baselines: unknown baseline {name!r} (choose from {', '.join(sorted(BASELINES))})")
    for strategy in strategies:
        TierConfig(strategy=strategy)  # refuses an unknown strategy even where no cell would use it
    share = options.get("fetch_share", 1.0)
    if share < 1.0 and not any(s in registry.SHARE_TAKERS for s in strategies):
        # every cell would run at share 1: the option would change nothing without a word
        takers = " or ".join(repr(n) for n in registry.SHARE_TAKERS)
        raise ConfigError(f"--fetch-share {share:g} applies to strategies {takers} only; add one to --strategy "
                          "or drop --fetch-share")
    cells: list[Cell] = []
    for h in hbm:
        for c in compressed:
            for e in evict:
                if c + e >= 1.0 - 1e-9:
                    raise ConfigError(f"--compressed {c:g} + --evict {e:g} leave nothing for HBM (must sum below 1)")
                ddr = max(round(1.0 - h - c - e, 12), 0.0)
                hbm_eff = round(1.0 - ddr - c - e, 12)
                for i, strategy in enumerate(_unique(strategies)):
                    if i and ddr == 0:
                        continue  # without a DDR tier every strategy is the first one
                    share = options.get("fetch_share", 1.0) if strategy in registry.SHARE_TAKERS else 1.0
                    config = TierConfig(hbm=hbm_eff, ddr=ddr, compressed=c, evict=e,
                                        **{**options, "strategy": strategy, "fetch_share": share})
                    cells.append(Cell(HIERARCHY if i == 0 else f"{HIERARCHY}/{strategy}", h, config))
    for name in _unique(baselines):
        for h in hbm:
            if h < 1.0:  # a budget of the whole context is the full cache
                config = TierConfig(hbm=h, evict=round(1.0 - h, 12), policy=name,
                                    **{**options, "fetch_share": 1.0})
                cells.append(Cell(name, h, config))
    for spec in _unique(presses):
        for h in hbm:
            if h < 1.0:
                config = TierConfig(hbm=h, evict=round(1.0 - h, 12), **{**options, "fetch_share": 1.0})
                cells.append(Cell(spec.method, h, config, press=spec))
    return cells


def prepare_samples(tokenizer, prompts: Sequence, device="cpu") -> list[Sample]:
    """Tokenize prompts (``tiersim.prompts.Prompt``) with the model's chat template."""
    from tiersim.models import format_prompt

    return [Sample(p.id, format_prompt(tokenizer, p.prompt).to(device), p.answer) for p in prompts]


def generate(model, input_ids, cache, max_new_tokens: int, generation_kwargs: dict | None = None) -> list[int]:
    """Greedy generation of one sample with the given cache; the new token ids."""
    from tiersim.models import generate_greedy

    return generate_greedy(model, input_ids, cache, max_new_tokens, generation_kwargs)


def _ids_text(ids: Sequence[int]) -> str:
    return " ".join(map(str, ids))


#: One generation to do: its position in the grid's run order, the sample, the cell (None: full cache).
Job = tuple[int, Sample, "Cell | None"]
#: One generation done: the job's position, new token ids, seconds, tier counts (layer 0, TieredCache only).
Generated = tuple[int, list[int], float, dict]
#: Generates jobs, yielding each as it finishes (any order): in this process, or on a Ray cluster.
Runner = Callable[[list[Job], int, "dict | None"], Iterable[Generated]]


def generate_run(model, input_ids, cell: Cell | None, max_new_tokens: int,
                 generation_kwargs: dict | None = None) -> tuple[list[int], float, dict]:
    """One generation under the full cache (``cell`` None) or a cell: (token ids, seconds, tier counts)."""
    from transformers import DynamicCache

    from tiersim.hierarchy.cache import TieredCache

    if cell is not None and cell.press is not None:
        return _press_run(model, input_ids, cell, max_new_tokens)
    cache = DynamicCache() if cell is None else TieredCache(cell.config)
    start = time.perf_counter()
    ids = generate(model, input_ids, cache, max_new_tokens, generation_kwargs)
    seconds = time.perf_counter() - start
    return ids, seconds, (cache.tier_counts(0) if cell is not None else {})


def _eos_ids(model) -> tuple:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))


def _press_run(model, input_ids, cell: Cell, max_new_tokens: int) -> tuple[list[int], float, dict]:
    """One generation under a kvpress press, decoded as kvpress's pipeline decodes."""
    from tiersim.quality import presses

    press = presses.make_press(cell.press, cell.config.evict, cell.config.retier_every)
    start = time.perf_counter()
    ids, _ = presses.decode(model, input_ids, max_new_tokens, press=press, spec=cell.press, eos_ids=_eos_ids(model))
    return ids, time.perf_counter() - start, {}


def teacher_forced_kl(model, samples: Sequence[Sample], cells: Sequence[Cell], full_tokens: Sequence,
                      on_pass: Callable[[str, "Cell | None"], None] | None = None) -> list[float]:
    """Per cell, the mean over prompts of KL(full cache || cell) per step, both reading the full cache's
    tokens (teacher forcing), every cache through the same decoding loop (:func:`presses.decode`).
    ``on_pass`` sees each (prompt, cell) pass as it finishes (cell None: the full cache's)."""
    from tiersim.hierarchy.cache import TieredCache
    from tiersim.quality import presses

    totals = [0.0] * len(cells)
    for sample, forced in zip(samples, full_tokens):
        _, reference = presses.decode(model, sample.input_ids, len(forced), forced=forced)
        if on_pass is not None:
            on_pass(sample.id, None)
        for i, cell in enumerate(cells):
            if cell.press is not None:
                press = presses.make_press(cell.press, cell.config.evict, cell.config.retier_every)
                _, logits = presses.decode(model, sample.input_ids, len(forced), press=press, spec=cell.press,
                                           forced=forced)
            else:
                _, logits = presses.decode(model, sample.input_ids, len(forced), cache=TieredCache(cell.config),
                                           forced=forced)
            totals[i] += metrics.teacher_forced_kl(reference, logits)
            if on_pass is not None:
                on_pass(sample.id, cell)
    return [total / len(samples) for total in totals]


def in_process(model) -> Runner:
    """The serial runner: every job in order, in this process."""

    def runner(jobs: list[Job], max_new_tokens: int, generation_kwargs: dict | None) -> Iterable[Generated]:
        for index, sample, cell in jobs:
            yield (index, *generate_run(model, sample.input_ids, cell, max_new_tokens, generation_kwargs))

    return runner


def run_grid(
    model,
    samples: Sequence[Sample],
    cells: Sequence[Cell],
    max_new_tokens: int,
    decode: Callable[[Sequence[int]], str] = _ids_text,
    generation_kwargs: dict | None = None,
    on_run: Callable[[Run], None] | None = None,
    journal=None,
    runner: Runner | None = None,
    kl: bool = False,
    on_kl: Callable[[str, "Cell | None"], None] | None = None,
) -> tuple[list[dict], dict]:
    """Run the full cache and every cell on every sample; returns (rows, full-cache summary).

    ``decode`` turns token ids into the text that exact match and answer extraction read;
    ``on_run`` sees every generation as it finishes (progress, inspection). With a ``journal``
    (:class:`tiersim.quality.journal.RunJournal`) runs it already holds are reused, not generated,
    and every new run is recorded in it the moment it finishes, here in the calling process whichever
    ``runner`` generated it (default: :func:`in_process` on ``model``; ``model`` may then be None).
    The rows depend only on the generated tokens, never on the order runs finish in. ``kl``: each row also
    gets ``mean_kl``, the teacher-forced KL against the full cache (:func:`teacher_forced_kl`, on ``model``
    in this process; not journaled), ``on_kl`` seeing each of its passes.
    """
    from tiersim.prompts import extract_answer

    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not samples:
        raise ConfigError("the grid needs at least one prompt")
    runner = runner or in_process(model)

    jobs: list[Job] = [(i, s, c) for i, (s, c) in enumerate((s, c) for s in samples for c in (None, *cells))]
    keys = [journal.key(s, c, max_new_tokens, generation_kwargs) if journal is not None else None
            for _, s, c in jobs]
    runs: list[Run | None] = [None] * len(jobs)

    def finish(index: int, ids: list[int], seconds: float, counts: dict, resumed: bool) -> None:
        _, sample, cell = jobs[index]
        text = decode(ids)
        runs[index] = Run(sample.id, FULL_CACHE if cell is None else cell.method, cell, ids, text,
                          extract_answer(text), seconds, counts, resumed=resumed)
        if on_run is not None:
            on_run(runs[index])

    pending: list[Job] = []
    for job, key in zip(jobs, keys):
        stored = journal.get(key) if journal is not None else None
        if stored is not None:
            finish(job[0], stored["token_ids"], stored["seconds"], stored["tier_counts"], True)
        else:
            pending.append(job)
    for index, ids, seconds, counts in runner(pending, max_new_tokens, generation_kwargs):
        if runs[index] is not None:
            continue  # a job reported twice is recorded once
        if journal is not None and journal.get(keys[index]) is None:
            journal.add(keys[index], ids, seconds, counts)
        finish(index, ids, seconds, counts, False)
    if any(run is None for run in runs):
        raise RuntimeError("the runner finished without generating every job")  # a bug, not user input

    stride = len(cells) + 1
    full = runs[::stride]
    per_cell = [runs[1 + i::stride] for i in range(len(cells))]
    truths = [s.answer for s in samples]
    full_accuracy = metrics.accuracy([r.answer for r in full], truths)
    rows = [_row(cell, cell_runs, full, truths, full_accuracy) for cell, cell_runs in zip(cells, per_cell)]
    if kl:
        if model is None:
            raise ConfigError("the teacher-forced KL runs in this process: it needs the model here (not --ray)")
        for row, value in zip(rows, teacher_forced_kl(model, samples, cells, [r.token_ids for r in full], on_kl)):
            row["mean_kl"] = value
    summary = {"accuracy": full_accuracy, "tokens_per_s": _rate(full), "mean_new_tokens": _mean_len(full)}
    return rows, summary


def _rate(runs: Sequence[Run]) -> float:
    return sum(len(r.token_ids) for r in runs) / max(sum(r.seconds for r in runs), 1e-9)


def _mean_len(runs: Sequence[Run]) -> float:
    return sum(len(r.token_ids) for r in runs) / len(runs)


def _row(cell: Cell, runs: list[Run], full: list[Run], truths: list, full_accuracy: float | None) -> dict:
    c = cell.config
    return {
        "method": cell.method,
        "hbm": cell.hbm,
        "ddr": c.ddr,
        "compressed": c.compressed,
        "evict": c.evict,
        "hbm_effective": c.hbm,
        "strategy": c.strategy,
        "fetch_share": c.fetch_share,
        "exact_match": metrics.exact_match([r.text for r in full], [r.text for r in runs]),
        "mean_tokens_to_divergence": metrics.mean_tokens_to_divergence(
            [r.token_ids for r in full], [r.token_ids for r in runs]
        ),
        "answer_agreement": metrics.answer_agreement([r.answer for r in full], [r.answer for r in runs]),
        "accuracy": metrics.accuracy([r.answer for r in runs], truths),
        "full_cache_accuracy": full_accuracy,
        "mean_new_tokens": _mean_len(runs),
        "tokens_per_s": _rate(runs),
    }
