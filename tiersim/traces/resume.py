"""Finished sequences of a capture, kept as they finish, so an interrupted capture resumes (as the grid's
journal does, tiersim.quality.journal).

A capture of many prompts on a CPU runs for hours; Ctrl-C or a killed job used to lose all of it. Each
finished sequence is written (atomically, as a one-sequence trace) into ``OUT.parts/`` beside the
``--out`` file, with ``context.json`` naming what decides the generated tokens (model, device, dtype,
the tier policy, ``max_new_tokens``, ``--full``, the prompt source, tiersim's version). Running the same
command again reuses the parts whose prompt and context match and captures only the rest; a changed
setting starts afresh. Once ``--out`` is written the folder is removed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd

from tiersim.atomic import check_name, write_json
from tiersim.errors import TiersimError
from tiersim.traces.format import Trace, read, write


def parts_path(out: Path) -> Path:
    """Where the capture writing ``out`` keeps its finished sequences."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _name(index: int, prompt_id: str) -> str:
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', prompt_id)[:60]}.parquet"


class CaptureParts:
    """The finished sequences of one capture: ``done`` (prompt ids), ``add`` one, ``merge`` them all."""

    def __init__(self, out: Path, context: dict, resume: bool = True):
        self.path = parts_path(out)
        check_name(self.path, "the folder of finished sequences")
        if self.path.exists() and not self.path.is_dir():  # rmtree below cannot clear it, add() cannot write in it
            raise TiersimError(f"capture keeps its finished sequences in {self.path}, which is a file, not a folder "
                               "(not tiersim's): move it away or give another --out")
        self.context = json.loads(json.dumps(context, default=str))
        stored = self.path / "context.json"
        same = False
        if resume and stored.is_file():
            try:
                same = json.loads(stored.read_text()) == self.context
            except (OSError, ValueError):
                same = False
        if self.path.exists() and not same:
            shutil.rmtree(self.path, ignore_errors=True)
        self.files: dict[str, Path] = {}
        if same:
            for file in sorted(self.path.glob("*.parquet")):
                try:
                    trace = read(file)
                except Exception:  # a part torn by a kill mid-write is captured again  # noqa: BLE001
                    continue
                self.files[str(trace.meta["sequences"][0]["prompt_id"])] = file

    def __len__(self) -> int:
        return len(self.files)

    def done(self, prompt_id: str) -> bool:
        return prompt_id in self.files

    def add(self, index: int, trace: Trace) -> None:
        """Keep one finished sequence (a trace of one sequence, as ``capture`` returns for one prompt)."""
        if not self.path.exists():
            self.path.mkdir(parents=True)
            write_json(self.path / "context.json", self.context)
        prompt_id = str(trace.meta["sequences"][0]["prompt_id"])
        file = self.path / _name(index, prompt_id)
        write(file, trace.steps, trace.meta)
        self.files[prompt_id] = file

    def merge(self, prompt_ids: list[str]) -> Trace:
        """The whole capture, in prompt order, sequences renumbered 0..n-1."""
        frames, sequences, meta = [], [], None
        for seq_id, prompt_id in enumerate(prompt_ids):
            part = read(self.files[prompt_id])
            steps = part.steps.copy()
            steps["seq_id"] = seq_id
            frames.append(steps)
            sequences += [{**s, "seq_id": seq_id} for s in part.meta["sequences"]]
            meta = meta or dict(part.meta)
        meta["sequences"] = sequences
        return Trace(meta=meta, steps=pd.concat(frames, ignore_index=True))

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
