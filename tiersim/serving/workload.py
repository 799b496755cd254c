"""The requests a serving run replays: synthetic arrivals at a rate, or a request file; numpy (pandas for files).

Synthetic arrivals are a renewal process at ``qps``: gamma inter-arrival times with coefficient of variation
``burstiness`` (1: Poisson; above 1: bursts, as production traces show; below 1: smoother than random). Prompt
and output lengths are log-normal around the ``--lengths`` means (``tiersim.traces.lengths``), the same
distribution the batch planner draws from. The arrival draws and the length draws come from separate streams of
one seed, so the same seed at another rate keeps every request's lengths and only rescales the gaps: a capacity
search compares like with like.

A request file has one row per request: ``arrival_s, prompt_tokens, output_tokens`` and optionally
``max_tokens``, what the request asked for at most (what a reserving queue holds room for; CSV, JSON lines or
Parquet; docs/file-formats.md, kind ``requests``). Whatever is wrong with it is one line naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tiersim.errors import TiersimError

COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
MAX_TOKENS_COLUMN = "max_tokens"  # optional: each request's own cap (a trace's max_tokens); never below its output
SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
#: Longest prompt or output a request may ask for (the simulator's token bound).
MAX_TOKENS = 10_000_000
MAX_REQUESTS = 10_000_000
#: Latest arrival a run takes (s, about 32 years). The engine's clock is float64 seconds: at 1e9 s its spacing is
#: 1.2e-7 s, so a millisecond step still lands within 1e-5 of itself; at 1e12 a TTFT came out 0.8% off and at 1e30
#: every latency was 0 (the step vanished in the clock's rounding). Past this bound a workload is refused.
MAX_ARRIVAL_S = 1e9
DEFAULT_SIGMA = 0.35  # the batch planner's spread of generated lengths (scenario.Scenario.sigma)


@dataclass(frozen=True)
class Requests:
    """What arrives: arrival times (s, sorted), prompt and output tokens per request, where it came from, and
    each request's ``max_tokens`` when the workload says (None: the engine's one value for all)."""

    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    source: str = "synthetic"
    max_tokens: np.ndarray | None = None
    #: Drawn requests cut at the model's context (``context``, tokens) by :func:`clip_to_context`; 0: none.
    context_cut: int = 0
    context: int | None = None

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def span_s(self) -> float:
        return float(self.arrival[-1] - self.arrival[0]) if len(self) > 1 else 0.0

    def describe(self) -> str:
        own = "" if self.max_tokens is None else f", max_tokens per request (mean {self.max_tokens.mean():,.0f})"
        cut = f", {self.context_cut:,} cut at the {self.context:,}-token context" if self.context_cut else ""
        return (f"{len(self):,} requests ({self.source}{cut}), prompts mean {self.prompt.mean():,.0f} tokens, "
                f"outputs mean {self.output.mean():,.0f} (p99 {np.percentile(self.output, 99):,.0f}){own}")


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float) -> np.ndarray:
    """``n`` whole lengths >= 1, log-normal with the given mean (the planner's draw, ``analytic.sample_lengths``,
    floored at 1 rather than 2: a one-token answer is a request too)."""
    mu = math.log(mean) - sigma ** 2 / 2
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 1, MAX_TOKENS).astype(np.int64)


def synthetic(n: int, qps: float, prompt_mean: float, output_mean: float, sigma: float = DEFAULT_SIGMA,
              burstiness: float = 1.0, seed: int = 0) -> Requests:
    """``n`` requests arriving at ``qps`` per second (gamma gaps of CV ``burstiness``), lengths log-normal."""
    if not (isinstance(n, (int, np.integer)) and 1 <= n <= MAX_REQUESTS):
        raise TiersimError(f"--requests must be a whole number in 1..{MAX_REQUESTS:,}, got {n!r}")
    if not (math.isfinite(qps) and qps > 0):
        raise TiersimError(f"--qps must be a number > 0, got {qps!r}")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise TiersimError(f"--burstiness must be a number > 0 (1: Poisson), got {burstiness!r}")
    for flag, mean in (("--prompt-lengths", prompt_mean), ("--lengths", output_mean)):
        if not (math.isfinite(mean) and mean >= 1):
            raise TiersimError(f"{flag}: mean length must be >= 1, got {mean!r}")
    arrivals_rng, lengths_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
    shape = 1.0 / burstiness ** 2
    gaps = arrivals_rng.gamma(shape, 1.0 / (qps * shape), n)
    arrival = np.cumsum(gaps) - gaps[0]  # the first request at t = 0
    if arrival[-1] > MAX_ARRIVAL_S:
        raise TiersimError(f"--qps {qps:g} with {n:,} requests spans {arrival[-1]:.3g} s of arrivals, past the "
                           f"{MAX_ARRIVAL_S:g} s the serving clock times a step in: raise --qps or serve fewer "
                           "requests")
    prompt = lognormal_lengths(lengths_rng, n, prompt_mean, sigma)
    output = lognormal_lengths(lengths_rng, n, output_mean, sigma)
    return Requests(arrival, prompt, output, f"{'Poisson' if burstiness == 1 else f'gamma CV {burstiness:g}'} "
                                             f"at {qps:g}/s")


def at_rate(requests: Requests, qps: float, burstiness: float = 1.0, seed: int = 0) -> Requests:
    """The same requests (lengths kept) on new synthetic arrivals at ``qps`` (what a capacity search varies)."""
    fresh = synthetic(len(requests), qps, 1.0, 1.0, burstiness=burstiness, seed=seed)
    return replace(requests, arrival=fresh.arrival, source=fresh.source)


def cut_outputs(requests: Requests, max_tokens: int) -> tuple[Requests, int]:
    """The requests with every output cut at ``max_tokens`` (what an engine stops a request at), and how many were;
    a request's own ``max_tokens`` is capped the same way."""
    cut = int((requests.output > max_tokens).sum())
    own = None if requests.max_tokens is None else np.minimum(requests.max_tokens, max_tokens)
    return replace(requests, output=np.minimum(requests.output, max_tokens), max_tokens=own), cut


def clip_to_context(requests: Requests, context: int | None) -> tuple[Requests, int, int]:
    """The drawn requests with each one longer than the model's ``context`` (prompt + output) cut to fit, as an
    engine stops a request at its context (vLLM's ``max_model_len``: the output ends there); a prompt that alone
    fills it keeps ``context - 1`` tokens and one output token. Returns (requests, how many were cut, the longest
    drawn, in tokens). For synthetic workloads only: their means are checked against the context, but a
    log-normal tail (``--sigma 1``) draws requests past it that no engine would run whole; a request file is the
    user's own, refused instead. None: the context is unknown, nothing is cut."""
    total = requests.prompt + requests.output
    longest = int(total.max())
    if context is None or longest <= context:
        return requests, 0, longest
    over = total > context
    prompt = np.minimum(requests.prompt, context - 1)
    output = np.minimum(requests.output, context - prompt)
    cut = replace(requests, prompt=prompt, output=output, context_cut=int(over.sum()), context=int(context))
    return cut, int(over.sum()), longest


def check(arrival, prompt, output, where: str, max_tokens=None) -> Requests:
    """The columns as a :class:`Requests` if they describe a workload; one line naming ``where`` if not."""
    arrival = np.asarray(arrival, dtype=float)
    if len(arrival) == 0:
        raise TiersimError(f"{where}: no requests (the file is empty)")
    if len(arrival) > MAX_REQUESTS:
        raise TiersimError(f"{where}: {len(arrival):,} requests, more than the {MAX_REQUESTS:,} a run takes")
    if not np.isfinite(arrival).all():
        row = int(np.flatnonzero(~np.isfinite(arrival))[0])
        raise TiersimError(f"{where}: arrival_s must be finite numbers; row {row + 1} is {arrival[row]:g}")
    if (arrival < 0).any():
        row = int(np.flatnonzero(arrival < 0)[0])
        raise TiersimError(f"{where}: arrival_s must be >= 0; row {row + 1} is {arrival[row]:g}")
    if (arrival > MAX_ARRIVAL_S).any():
        row = int(np.flatnonzero(arrival > MAX_ARRIVAL_S)[0])
        raise TiersimError(f"{where}: arrival_s must be at most {MAX_ARRIVAL_S:g} s (the serving clock's range); "
                           f"row {row + 1} is {arrival[row]:g}")
    if (np.diff(arrival) < 0).any():
        row = int(np.flatnonzero(np.diff(arrival) < 0)[0]) + 1
        raise TiersimError(f"{where}: arrival_s must be sorted (non-decreasing); row {row + 1} ({arrival[row]:g}) "
                           f"comes before row {row} ({arrival[row - 1]:g})")
    columns = []
    named = [("prompt_tokens", prompt), ("output_tokens", output)]
    for name, values in named + ([(MAX_TOKENS_COLUMN, max_tokens)] if max_tokens is not None else []):
        values = np.asarray(values, dtype=float)
        bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 1) | (values > MAX_TOKENS)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise TiersimError(f"{where}: {name} must be whole numbers in 1..{MAX_TOKENS:,}; row {row + 1} is "
                               f"{values[row]:g}")
        columns.append(values.astype(np.int64))
    own = columns[2] if max_tokens is not None else None
    if own is not None and (own < columns[1]).any():
        row = int(np.flatnonzero(own < columns[1])[0])
        raise TiersimError(f"{where}: row {row + 1} has output_tokens {columns[1][row]:,} above its max_tokens "
                           f"{own[row]:,} (a request stops at its max_tokens)")
    return Requests(arrival, columns[0], columns[1], where, own)


def _format(path: Path, label: str) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise TiersimError(f"{label}: {path}: expected a .csv, .jsonl or .parquet request file")
    return fmt


def read_requests(path: str | Path, label: str = "--requests-file") -> Requests:
    """A request file (CSV, JSON lines or Parquet with the :data:`COLUMNS`), checked; one line on any failure."""
    import pandas as pd

    path = Path(path)
    fmt = _format(path, label)
    if not path.exists():
        raise TiersimError(f"{label}: file not found: {path}")
    if path.is_dir():
        raise TiersimError(f"{label}: {path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise TiersimError(f"{label}: {path}: no requests (the file is empty)")
    try:
        if fmt == "parquet":
            from tiersim import fileformat

            with open(path, "rb") as fh:
                tagged = fh.read(4) == fileformat.PARQUET_MAGIC
            if not tagged:
                raise TiersimError(f"{label}: {path} is not a Parquet file")
            import pyarrow.parquet as pq

            if (pq.ParquetFile(path).schema_arrow.metadata or {}).get(fileformat.META_KEY):
                _, table = fileformat.read(path, [fileformat.REQUESTS], label=label)
                frame = table.to_pandas()
            else:  # a foreign Parquet file with the three columns is welcome
                frame = pd.read_parquet(path)
        elif fmt == "csv":
            import warnings

            # index_col=False: a row with more fields than the header is refused (pandas' default takes the extra
            # leading field as the index and shifts every value one column left, silently)
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, comment="#", index_col=False)
        else:
            # dtype=False: each value as written (pandas' inference turns a true among counts into 1)
            frame = pd.read_json(path, lines=True, precise_float=True, dtype=False)
    except TiersimError:
        raise
    except PermissionError:
        raise TiersimError(f"{label}: cannot read {path}: permission denied") from None
    except Exception as exc:  # pandas and pyarrow raise many types for malformed files
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise TiersimError(f"{label}: {path} is not a readable {fmt} request file: {text}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise TiersimError(f"{label}: {path}: missing column(s) {', '.join(missing)} (a request file has "
                           f"{', '.join(COLUMNS)})")
    names = COLUMNS + ((MAX_TOKENS_COLUMN,) if MAX_TOKENS_COLUMN in frame.columns else ())
    twice = [c for c in names if f"{c}.1" in set(map(str, frame.columns))]
    if fmt == "csv" and twice:  # pandas renames the second 'x' to 'x.1' and the first one is read, in silence
        raise TiersimError(f"{label}: {path}: column {twice[0]} appears more than once; keep one")
    values = [_numbers(frame[c], c, f"{label}: {path}") for c in names]
    return check(*values[:3], where=f"{label}: {path}", max_tokens=values[3] if len(values) > 3 else None)


def _numbers(column, name: str, where: str):
    """``column`` as numbers, or one line: text that reads as a number is one (CSV is all text), but true/false and
    times are not counts or seconds (pandas would read true as 1 and a timestamp as nanoseconds since 1970)."""
    import pandas as pd

    kinds = pd.api.types
    if kinds.is_bool_dtype(column) or kinds.is_datetime64_any_dtype(column) or kinds.is_timedelta64_dtype(column):
        raise TiersimError(f"{where}: {name} must be numbers, got a {column.dtype} column")
    if column.dtype == object:
        import datetime

        odd = column.map(lambda v: isinstance(v, (bool, np.bool_, datetime.date, datetime.timedelta)))
        if odd.any():
            row = int(odd.to_numpy().argmax())
            raise TiersimError(f"{where}: {name} must be numbers; row {row + 1} is {column.iloc[row]!r:.40}")
    try:
        return pd.to_numeric(column, errors="raise")
    except (ValueError, TypeError) as exc:
        raise TiersimError(f"{where}: every value must be a number ({str(exc)[:120]})") from None


def write_requests(path: str | Path, requests: Requests) -> Path:
    """Write ``requests`` as a request file (format by suffix; Parquet carries the ``requests`` kind), atomically."""
    import pandas as pd

    from tiersim import fileformat
    from tiersim.atomic import atomic_path

    path = Path(path)
    fmt = _format(path, "request file")
    frame = pd.DataFrame({"arrival_s": requests.arrival, "prompt_tokens": requests.prompt,
                          "output_tokens": requests.output})
    if requests.max_tokens is not None:
        frame[MAX_TOKENS_COLUMN] = requests.max_tokens
    if fmt == "parquet":
        return fileformat.write_table(path, frame, {**fileformat.header(fileformat.REQUESTS), "source": requests.source})
    with atomic_path(path) as tmp:
        if fmt == "csv":
            frame.to_csv(tmp, index=False, float_format="%.17g")
        else:  # json.dumps writes each float's shortest exact repr: the file reads back bit for bit
            import json

            tmp.write_text("".join(json.dumps(row) + "\n" for row in frame.to_dict("records")))
    return path
