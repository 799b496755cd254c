"""Reasoning-length presets and the ``--lengths`` parser; standard library only (the planner's fast start
imports it without pandas)."""

from __future__ import annotations

import math

from tiersim.errors import TiersimError

#: ``synth``'s static bounds (its total size is bounded by memory, see tiersim.traces.synth.check_fits):
#: sequences, layers (the largest open decoders have 126), and the lengths' log-normal spread, above which
#: the median sequence is under e**-2 = 14% of the mean and most are a few tokens long.
MAX_SEQUENCES = 1_000_000
MAX_LAYERS = 1024
MAX_SIGMA = 2.0

#: Reasoning-length presets (mean generated tokens, R1-Distill-Qwen-7B, 16K budget; design.md).
LENGTH_PRESETS = {"gsm8k": 1500, "math500": 3900, "amc23": 6800, "gpqa": 10200, "aime": 13800}


def parse_lengths(spec: str) -> float:
    """'math500' -> its mean length; '4096' -> 4096."""
    key = spec.strip().lower()
    if key in LENGTH_PRESETS:
        return float(LENGTH_PRESETS[key])
    try:
        value = float(key)
    except ValueError:
        raise TiersimError(
            f"--lengths: expected a number or one of {', '.join(LENGTH_PRESETS)}, got {spec!r}"
        ) from None
    if not math.isfinite(value):
        raise TiersimError(f"--lengths: mean length must be a finite number, got {spec!r}")
    if value < 1:
        raise TiersimError(f"--lengths: mean length must be >= 1, got {spec!r}")
    return value
