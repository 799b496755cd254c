"""An append-only record of finished grid runs, so an interrupted grid resumes where it stopped.

A grid on a real model runs for an hour on a laptop and longer on a 32B model; losing it to a killed
job is the costliest failure the tool has. Every finished generation is appended as one JSON line
(flushed and fsynced) beside the ``--out`` file; running the same command again reads the lines back
and generates only what is missing. A line is reused only when everything that decides its tokens is
equal (model, device, dtype, library versions, the prompt's token ids, the cell's full configuration,
``max_new_tokens``, generation settings), so a changed setting regenerates instead of mixing results.
A torn last line (the job killed mid-write) is ignored. The CLI removes the journal once ``--out`` is
written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

from tiersim.atomic import WriteError, check_name
from tiersim.errors import TiersimError, os_reason

JOURNAL_SCHEMA = 1


def journal_path(out: Path) -> Path:
    """Where the grid writing ``out`` keeps its finished runs."""
    out = Path(out)
    return out.with_name(out.name + ".runs.jsonl")


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def usable(record) -> bool:
    """A line the grid can reuse as it stands: this schema, a key, token ids, seconds and tier counts of the types
    :meth:`RunJournal.add` writes. Any other line (damaged on disk, edited by hand) is skipped like a torn one, so
    that run is done again: a string of token ids reached the tokenizer as a TypeError traceback."""
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

    if not (isinstance(record, dict) and record.get("schema") == JOURNAL_SCHEMA and isinstance(record.get("key"), str)):
        return False
    ids, seconds, counts = record.get("token_ids"), record.get("seconds"), record.get("tier_counts")
    return (isinstance(ids, list) and all(count(t) and t < 2**31 for t in ids)
            and isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
            and seconds >= 0 and isinstance(counts, dict)
            and all(isinstance(k, str) and count(v) for k, v in counts.items()))


class RunJournal:
    """Finished runs by key; ``get`` a stored one, ``add`` a new one (written through at once)."""

    def __init__(self, path: Path, context: dict):
        self.path = Path(path)
        check_name(self.path, "the grid's journal of finished runs")
        self.context = context
        self._runs: dict[str, dict] = {}
        self._file = None
        if self.path.exists() and not self.path.is_file():
            # A folder (or a fifo) where the journal goes: reading, appending and deleting it each fail with a
            # bare errno ('[Errno 21] Is a directory'), which names neither the journal nor what belongs there.
            kind = "a directory" if self.path.is_dir() else "not a regular file"
            raise TiersimError(f"{self.path} is {kind}: the grid keeps its finished runs there, in a file "
                               "(OUT.runs.jsonl beside --out); move it away or choose another --out")
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:  # bytes: one damaged line must not make the file unreadable
                lines = f.read().splitlines()
        except OSError as exc:
            raise TiersimError(f"cannot read the grid's journal {self.path}: {os_reason(exc)}") from None
        for line in lines:
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                continue  # a torn or damaged write: that run is simply done again
            if usable(record):
                self._runs[record["key"]] = record

    def __len__(self) -> int:
        return len(self._runs)

    def key(self, sample, cell, max_new_tokens: int, generation_kwargs: dict | None) -> str:
        """What decides a run's tokens, hashed; ``cell`` None is the full cache."""
        ids = sample.input_ids.reshape(-1).tolist()
        config = None if cell is None else {"method": cell.method, "hbm": cell.hbm,
                                            "config": dataclasses.asdict(cell.config)}
        if cell is not None and cell.press is not None:  # only then: earlier journals' keys stay valid
            config["press"] = dataclasses.asdict(cell.press)
        return _digest({
            "context": self.context, "sample": sample.id, "input_ids": _digest(ids), "cell": config,
            "max_new_tokens": max_new_tokens, "generation": generation_kwargs or {},
        })

    def get(self, key: str) -> dict | None:
        return self._runs.get(key)

    def add(self, key: str, token_ids: list[int], seconds: float, tier_counts: dict) -> None:
        record = {"schema": JOURNAL_SCHEMA, "key": key, "token_ids": list(token_ids), "seconds": seconds,
                  "tier_counts": tier_counts}
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torn = self._ends_torn()
                self._file = open(self.path, "a", encoding="utf-8")
                if torn:  # end the torn line, so this record does not join it and get lost with it
                    self._file.write("\n")
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            # A full disk: the runs already written stay (a torn last line is skipped on resume). Close the
            # file here, since a later close() would flush the same unwritable buffer again and raise over
            # the grid's "runs are kept" line; and name the file, which a bare write() error does not.
            file, self._file = self._file, None
            if file is not None:
                try:
                    file.close()
                except OSError:
                    pass
            raise WriteError(f"cannot write {self.path}: {os_reason(exc)}") from None
        self._runs[key] = record

    def _ends_torn(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def discard(self) -> None:
        """Forget every run and delete the file (the grid finished, or the user asked to start over)."""
        self.close()
        self._runs.clear()
        self.path.unlink(missing_ok=True)
