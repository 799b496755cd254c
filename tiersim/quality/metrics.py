"""Per-cell quality metrics against the full cache (and the prompts' ground truth, where given).

Greedy decoding makes the full cache's output the reference: a lossless policy must reproduce it
token for token, and a lossy one is measured by how much and how early it departs from it.
"""

from __future__ import annotations

from typing import Sequence

from tiersim.prompts import answers_match


def exact_match(reference: Sequence[str], candidate: Sequence[str]) -> float:
    """Fraction of prompts whose generated text equals the full cache's."""
    _same_length(reference, candidate)
    if not reference:
        return 0.0
    return sum(r == c for r, c in zip(reference, candidate)) / len(reference)


def tokens_to_divergence(reference: Sequence[int], candidate: Sequence[int]) -> int:
    """Index of the first generated token that differs; the common length when one is a prefix of the other.

    Identical outputs give their full length, so a lossless cell scores the number of tokens generated.
    """
    for index, (r, c) in enumerate(zip(reference, candidate)):
        if r != c:
            return index
    return min(len(reference), len(candidate))


def mean_tokens_to_divergence(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> float:
    _same_length(reference, candidate)
    if not reference:
        return 0.0
    return sum(tokens_to_divergence(r, c) for r, c in zip(reference, candidate)) / len(reference)


def same_answer(a: str | None, b: str | None) -> bool:
    """Two extracted final answers agree: equal (numerically when both are numbers), or both absent."""
    if a is None or b is None:
        return a is None and b is None
    return answers_match(a, b)


def answer_agreement(reference: Sequence[str | None], candidate: Sequence[str | None]) -> float:
    """Fraction of prompts whose extracted final answer agrees with the full cache's (both absent counts)."""
    _same_length(reference, candidate)
    if not reference:
        return 0.0
    return sum(same_answer(r, c) for r, c in zip(reference, candidate)) / len(reference)


def accuracy(answers: Sequence[str | None], truths: Sequence[str | None]) -> float | None:
    """Fraction correct over the prompts that carry a ground-truth answer; None when none do."""
    _same_length(answers, truths)
    graded = [(a, t) for a, t in zip(answers, truths) if t is not None]
    if not graded:
        return None
    return sum(answers_match(a, t) for a, t in graded) / len(graded)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"metric inputs differ in length: {len(a)} reference vs {len(b)} candidate outputs")


def teacher_forced_kl(reference_logits: Sequence, logits: Sequence) -> float:
    """Mean KL(full cache || cell) over the steps of one prompt, both decoding the full cache's tokens.

    Each step's next-token distributions are compared in float64; a divergence count alone says little
    when every cell of a 50% budget changes the text, the KL says how far each step's prediction moved.
    """
    import torch

    if len(reference_logits) != len(logits) or not logits:
        raise ValueError(f"teacher-forced KL needs equally many steps, got {len(reference_logits)} and {len(logits)}")
    ref = torch.log_softmax(torch.stack(list(reference_logits)).double(), dim=-1)
    got = torch.log_softmax(torch.stack(list(logits)).double(), dim=-1)
    return float((ref.exp() * (ref - got)).sum(dim=-1).clamp_min(0).mean())
