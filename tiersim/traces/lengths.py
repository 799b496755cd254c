"""Reasoning-length presets and the ``--lengths`` parser; standard library only (the planner's fast start
imports it without pandas)."""

from __future__ import annotations

from tiersim.errors import TiersimError

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
    if value < 1:
        raise TiersimError(f"--lengths: mean length must be >= 1, got {spec!r}")
    return value
