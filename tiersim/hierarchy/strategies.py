"""The offload strategies' vocabulary, written once: how the DDR tier reaches attention; standard library only.

One entry per strategy: its name (what ``TierConfig.strategy``, ``--strategy`` and the files say), whether
its output equals the full cache's (up to floating-point rounding), the words and marks the tables and
plots show, and which :mod:`tiersim.hierarchy.access` class executes it in the real cache (None: the
simulator prices it, the cache does not run it yet). The cache (``access.make_access``), TierConfig's
check, the simulator (``tiersim.simulator.strategies`` registers each name's costs), the CLI's help and
the report all read this table; nothing else lists strategies. It sits in layer 1 beside the cache and
imports nothing, so the report (also layer 1) and TierConfig can read it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    """One way for the DDR tier to reach attention."""

    name: str
    exact: bool  # same output as the full cache up to floating-point rounding
    label: str  # the tables' and plots' name ("int8 transfer")
    short: str  # a narrow table column ("pf", "sel*")
    symbol: str  # Plotly marker symbol of its curve
    #: The :mod:`tiersim.hierarchy.access` class that runs it in the cache (None: simulator only), and whether
    #: that class takes ``TierConfig.fetch_share``.
    access: str | None = None
    takes_share: bool = False
    #: How a row's ``share`` reads in a table ("host": "(40% host)"; "" : the bare percentage; None: not shown).
    share_words: str | None = None
    help: str = ""  # one phrase for --help
    #: What makes an approximate strategy inexact, after its label in a table's footnote.
    caveat: str = ""


_ENTRIES = (
    Strategy("prefetch", True, "prefetch", "pf", "circle", access="Prefetch",
             help="prefetch (the whole DDR tier copied one layer ahead; bit-exact)"),
    Strategy("host-attention", True, "host-attention", "host", "diamond", access="HostAttention",
             help="host-attention (attended on the host, merged by log-sum-exp)"),
    Strategy("hybrid", True, "hybrid", "hyb", "star-diamond", access="Hybrid", takes_share=True, share_words="host",
             help="hybrid (a share fetched, the rest host-attended)"),
    Strategy("recompute", True, "recompute", "kvpr", "triangle-up", share_words="act",
             help="recompute (KVPR: a share sent as activations, K and V recomputed on the GPU)"),
    Strategy("selective", False, "selective", "sel*", "cross", access="Selective", takes_share=True, share_words="",
             help="selective (approximate: only a share of the DDR tokens fetched)",
             caveat="fetches the DDR tokens that held 99% of its attention in the trace (an oracle)"),
    Strategy("compressed-transfer", False, "int8 transfer", "int8*", "x",
             help="compressed-transfer (approximate: the DDR tier crosses as int8)",
             caveat="quantizes the DDR tier"),
)
REGISTRY: dict[str, Strategy] = {s.name: s for s in _ENTRIES}
#: Every strategy, in the order tables and plots list them.
NAMES = tuple(REGISTRY)
#: Those the cache runs (TierConfig.strategy accepts these).
CACHE_STRATEGIES = tuple(s.name for s in _ENTRIES if s.access is not None)
APPROXIMATE = frozenset(s.name for s in _ENTRIES if not s.exact)
#: Those whose split is ``TierConfig.fetch_share`` in the cache.
SHARE_TAKERS = tuple(s.name for s in _ENTRIES if s.takes_share)
#: The row a plot draws when nothing is in DDR (no strategy applies): its name and marker.
NO_OFFLOAD = "none"
NO_OFFLOAD_SYMBOL = "square"
#: Marker symbol by name, the no-offload row included.
SYMBOLS = {NO_OFFLOAD: NO_OFFLOAD_SYMBOL, **{s.name: s.symbol for s in _ENTRIES}}


def get(name: str) -> Strategy:
    """The entry named ``name``; KeyError names the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(NAMES)}") from None


def caveats(names) -> str:
    """Why the approximate ones among ``names`` are approximate, one clause each ("" when none is)."""
    return "; ".join(f"{REGISTRY[n].label} {REGISTRY[n].caveat}" for n in names if n in APPROXIMATE)


def help_text(names=None) -> str:
    """The strategies' phrases joined for --help (``names``: a subset, e.g. the cache's)."""
    return ", ".join(REGISTRY[n].help for n in (names or NAMES))


def point_words(name: str | None, fetch_share: float | None = None) -> str:
    """How a measured point names the strategy it ran, beside its split in a table ("" for prefetch, the default:
    a prefetch grid's rows read as before; "host-attention"; "hybrid fetch 0.5"), so a host strategy's point is
    never read as the prefetch point of the same HBM share. Only a strategy that takes a share shows it: the
    others' is implied (prefetch fetches all, host attention none)."""
    if name in (None, "prefetch"):
        return ""
    share = own_share(name, fetch_share)
    return f"{name}{'' if share is None else f' fetch {share:g}'}"


def own_share(name: str | None, fetch_share: float | None) -> float | None:
    """The fetch share a point run with strategy ``name`` chose, or None where the strategy implies its split.

    Every graph-executor point records the share its step fetched (prefetch 1.0, host attention 0.0), but only a
    strategy that takes ``TierConfig.fetch_share`` (hybrid, selective) chose it: for the others it is a
    consequence, and reading it as a knob would price or label the point as something it did not run. The one
    reading of that rule, for the validator's predictions, ``simulate --against`` and the tables' words; an
    unregistered name takes none (its own check refuses it)."""
    spec = REGISTRY.get(name or "prefetch")
    return fetch_share if spec is not None and spec.takes_share else None
