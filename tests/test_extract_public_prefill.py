"""scripts/extract_public_prefill.py's merge: the rebuilt sources replace their own TTFT cases, every other source's
cases are kept, and the file is written atomically (tiersim.atomic), never half-written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("extract_public_prefill", REPO / "scripts" / "extract_public_prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rebuilt_sources_replace_their_cases_and_the_others_are_kept(tmp_path, monkeypatch):
    m = _script()
    out = tmp_path / "prefill.json"
    out.write_text(json.dumps({"sources": {"x": 1}, "ttft_cases": [
        {"model": "old-splitwise"},  # no source: splitwise's, rebuilt
        {"source": "argonne-vllm", "model": "old-argonne"},
        {"source": "trtllm-v0.5-a100", "model": "hand-kept"}]}))
    monkeypatch.setattr(m, "vidur_cases", lambda _d: [{"gpu": "a100"}])
    monkeypatch.setattr(m, "splitwise_cases", lambda _p: [{"source": "splitwise", "model": "new-splitwise"}])
    monkeypatch.setattr(m, "argonne_cases", lambda _p: [{"source": "argonne-vllm", "model": "new-argonne"}])
    monkeypatch.setattr(m, "distserve_cases", lambda _p: [])
    writes = []
    monkeypatch.setattr(m, "write_text", lambda path, text: (writes.append(path), Path(path).write_text(text)))
    m.main(["x", "vidur", "split.csv", "argonne.csv", "distserve", str(out)])
    doc = json.loads(out.read_text())
    assert writes == [out] and doc["sources"] == {"x": 1} and doc["gemm_cases"] == [{"gpu": "a100"}]
    assert [c["model"] for c in doc["ttft_cases"]] == ["new-splitwise", "new-argonne", "hand-kept"]
