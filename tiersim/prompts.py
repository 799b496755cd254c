"""Prompt sets: the bundled reasoning problems, or any JSONL with a ``prompt`` field per line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tiersim.errors import TiersimError

BUNDLED = "prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    answer: str | None = None


def load_prompts(path: str | Path | None = None, n: int | None = None) -> list[Prompt]:
    """The first ``n`` prompts of ``path`` (default: the bundled set written for tiersim)."""
    if n is not None and n < 1:
        raise TiersimError(f"--n must be >= 1, got {n}")
    if path is None:
        source = resources.files("tiersim") / "data" / BUNDLED
        text, label = source.read_text(encoding="utf-8"), "bundled prompts"
    else:
        file = Path(path)
        if file.is_dir():
            raise TiersimError(f"--prompts {file} is a directory; give a JSONL file")
        if not file.is_file():
            raise TiersimError(f"prompts file not found: {file}")
        try:
            text, label = file.read_text(encoding="utf-8"), str(file)
        except UnicodeDecodeError:
            raise TiersimError(f"--prompts {file}: not a UTF-8 text file (JSONL expected)") from None
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TiersimError(f"{label}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise TiersimError(f"{label}: line {number} has no 'prompt' text field")
        answer = item.get("answer")
        prompt_id = str(item.get("id", number))
        if prompt_id in seen:
            raise TiersimError(f"{label}: line {number} repeats id {prompt_id!r}")
        seen.add(prompt_id)
        prompts.append(Prompt(prompt_id, item["prompt"], None if answer is None else str(answer)))
    if not prompts:
        raise TiersimError(f"{label}: no prompts found")
    if n is not None and n > len(prompts):  # running fewer than asked without a word would be silently wrong
        raise TiersimError(f"--n {n}: {label} holds {len(prompts)} prompts; give --n {len(prompts)} or fewer, "
                           "or --prompts FILE with more")
    return prompts[:n] if n is not None else prompts


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FILLER = {"the", "a", "an", "is", "it", "its", "answer", "final"}


def extract_answer(text: str) -> str | None:
    """The final answer: what follows the last 'Answer:' (else the last number), normalised.

    Small models write "Answer: $1,250.50 dollars" or "**Answer:** The green box": the first number
    after the marker wins (units and currency dropped), else its first meaningful word, lowercased.
    With no usable marker the last number in the text is the model's best guess.
    """
    if "Answer:" in text:
        tail = text.rsplit("Answer:", 1)[1]
        numbers = _NUMBER.findall(tail)
        if numbers:
            return _normalise_number(numbers[0])
        words = [w.lower() for w in re.findall(r"[A-Za-z]+", tail)]
        words = [w for w in words if w not in _FILLER]
        if words:
            return words[0]
    numbers = _NUMBER.findall(text)
    return _normalise_number(numbers[-1]) if numbers else None


def _normalise_number(token: str) -> str:
    token = token.replace(",", "")
    if "." in token:
        token = token.rstrip("0").rstrip(".")
    return "0" if token in ("-0", "") else token


def answers_match(predicted: str | None, truth: str | None) -> bool:
    """Numeric answers compare with a small relative tolerance; words compare case-insensitively."""
    if predicted is None or truth is None:
        return False
    try:
        pred, want = float(predicted.replace(",", "")), float(truth.replace(",", ""))
    except ValueError:
        return predicted.strip().lower() == truth.strip().lower()
    return abs(pred - want) <= 1e-6 * max(1.0, abs(want))
