"""Capture: run a real model under the tier policy and record what every layer did at every step.

The cache's recorder hook hands one row per (step, layer) to :class:`StepRecorder`; the rows of
all prompts become the trace's ``steps`` table. Capture uses greedy decoding so a rerun with the
same inputs gives the same trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import pandas as pd

from tiersim.errors import TiersimError
from tiersim.hierarchy.config import TierConfig
from tiersim.hierarchy.record import StepRecord
from tiersim.traces.format import COLUMNS, Trace, new_meta


#: Memory a capture holds, measured on the bundled trace's rows: a (step, layer) row as the recorder keeps
#: it (a Python dict of 18 fields) and in the merged table, and ``--full``'s attention row per retained
#: token (a Python int and float while recorded, an int64 and a float32 once merged).
ROW_BYTES_RECORDED, ROW_BYTES_MERGED = 550, 70
TOKEN_BYTES_RECORDED, TOKEN_BYTES_MERGED = 72, 12


def check_fits(n: int, prompt_tokens: int, max_new_tokens: int, model_info: dict, full: bool,
               dtype_bytes: int = 4) -> None:
    """Refuse a capture whose trace or cache would not fit in half the memory available (one line naming
    the options to lower), before its first token: one sequence's recorded rows and KV cache, or all the
    sequences' merged trace, whichever is larger. A model that does not say its shape is not checked."""
    from tiersim.options import available_memory

    layers, kv_token = model_info.get("num_layers"), model_info.get("kv_bytes_per_token")
    if not layers or not kv_token:
        return
    rows = layers * (max_new_tokens + 1)  # one row per layer for the prefill and for each new token
    attended = rows * (prompt_tokens + max_new_tokens / 2) if full else 0  # retained tokens, on average
    one = rows * ROW_BYTES_RECORDED + attended * TOKEN_BYTES_RECORDED
    one += kv_token / 2 * dtype_bytes * (prompt_tokens + max_new_tokens)  # kv_bytes_per_token is for bf16
    merged = n * (rows * ROW_BYTES_MERGED + attended * TOKEN_BYTES_MERGED)
    need, budget = max(one, merged), available_memory() // 2
    if need > budget:
        lower = "--max-new-tokens or --n" + (", or leave out --full" if full else "")
        raise TiersimError(f"capture would hold ~{need / 1e9:,.1f} GB ({n:,} sequence{'s' * (n != 1)} of up to {max_new_tokens:,} "
                           f"tokens{' with every attention row' if full else ''}), more than half of the "
                           f"{2 * budget / 1e9:.1f} GB this machine has available: lower {lower}")


@dataclass
class StepRecorder:
    """Collects the cache's per-(step, layer) rows for one sequence at a time."""

    rows: list[dict] = field(default_factory=list)
    seq_id: int = 0

    def __call__(self, record: StepRecord) -> None:
        self.rows.append({"seq_id": self.seq_id, **record.row()})

    def frame(self) -> pd.DataFrame:
        if not self.rows:
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})
        return pd.DataFrame(self.rows)


@dataclass
class SequenceResult:
    seq_id: int
    prompt_id: str
    prompt_len: int
    new_tokens: int
    text: str
    seconds: float


def generate_one(model, tokenizer, text: str, config: TierConfig, max_new_tokens: int, recorder=None,
                 full: bool = False):
    """Greedy generation of one prompt with a TieredCache; returns (input_ids, new_token_ids, cache)."""
    import torch

    from tiersim.hierarchy.cache import TieredCache
    from tiersim.models import format_prompt, generate_greedy, generation_kwargs

    input_ids = format_prompt(tokenizer, text).to(model.device)
    cache = TieredCache(config, recorder=recorder, record_attention=full)
    new_ids = generate_greedy(model, input_ids, cache, max_new_tokens, generation_kwargs(tokenizer))
    return input_ids, torch.tensor(new_ids, dtype=torch.long), cache


def capture(
    model,
    tokenizer,
    prompts: Iterable,
    config: TierConfig,
    max_new_tokens: int,
    model_info: dict,
    device: str = "cpu",
    prompts_source: str = "bundled",
    on_sequence: Callable[[SequenceResult], None] | None = None,
    full: bool = False,
) -> Trace:
    """Run every prompt under ``config`` and return the trace (not yet written).

    ``full`` keeps each step's attention row (``attn_positions``, ``attn_probs`` list columns):
    large, but enough to replay other policies offline without rerunning the model.
    """
    recorder = StepRecorder()
    sequences: list[dict] = []
    for seq_id, prompt in enumerate(prompts):
        recorder.seq_id = seq_id
        start = time.perf_counter()
        input_ids, new_ids, _ = generate_one(model, tokenizer, prompt.prompt, config, max_new_tokens, recorder, full)
        seconds = time.perf_counter() - start
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        result = SequenceResult(seq_id, prompt.id, int(input_ids.shape[1]), int(new_ids.shape[0]), text, seconds)
        sequences.append(
            {
                "seq_id": seq_id,
                "prompt_id": prompt.id,
                "prompt_len": result.prompt_len,
                "new_tokens": result.new_tokens,
                "text": text,
                "answer": prompt.answer,
            }
        )
        if on_sequence is not None:
            on_sequence(result)
    steps = recorder.frame()
    meta = new_meta(
        model=model_info,
        policy=config.to_dict(),
        sequences=sequences,
        device=device,
        prompts_source=prompts_source,
        max_new_tokens=max_new_tokens,
    )
    meta["mode"] = "full" if full else "summary"
    # Optional record fields (selective's ddr_fetched, --full's attention) where the run produced them.
    extra = [c for c in StepRecord.optional_columns() if c in steps.columns]
    return Trace(meta=meta, steps=steps.astype(COLUMNS)[list(COLUMNS) + extra])
