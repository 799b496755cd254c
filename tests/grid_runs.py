"""Small grid inputs shared by the resume and the Ray tests: two prompts, an hierarchy cell and H2O."""

from __future__ import annotations

import torch

from tiersim.quality.grid import Sample, build_cells


def samples(count: int = 2) -> list[Sample]:
    """``count`` seeded 40-token prompts for the tiny models (vocabulary 256)."""
    gen = torch.Generator().manual_seed(7)
    return [Sample(f"s{i}", torch.randint(1, 256, (1, 40), generator=gen), None) for i in range(count)]


def cells():
    return build_cells([0.5], [0, 0.2], [0.0], ["h2o"], recent_window=4, retier_every=4)


def without_timing(rows):
    """Rows without their measured speed: what must be equal between two runs of the same grid."""
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]
