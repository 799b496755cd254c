"""Keyword names that moved between transformers releases.

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values``
to ``cache`` (the old name now warns and goes away in 6.0); older 5.x releases, such as the GPU
machine's 5.17, know only ``past_key_values``. Asking the model's own signature keeps one code path
right on both without a version table. Imports nothing heavy: the validator uses it on a torch-only host.
"""

from __future__ import annotations

import inspect


def cache_kwargs(model, cache) -> dict:
    """The keyword argument that hands ``cache`` to this model's ``forward`` or ``generate``."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
