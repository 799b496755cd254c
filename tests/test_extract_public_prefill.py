"""scripts/extract_public_prefill.py's merge: the rebuilt sources replace their own TTFT cases, every other source's
cases are kept, and the file is written atomically (tiersim.atomic), never half-written; and its selection rule for
TensorRT-LLM 0.9.0's performance page, on a made-up page of that layout."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

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


#: A made-up page in the layout of TensorRT-LLM 0.9.0's docs/source/performance.md (the numbers are not the page's):
#: an FP8 table before the A100 one, TP 1 rows, a left-out model and spacer rows, all of which the rule must skip.
PAGE = """# Performance
## Peak Throughput
All data was generated using version 0.9.0
### A100 GPUs (FP16)
| Model | Batch Size | TP (1) | Input Length | Output Length | Throughput (out tok/s/GPU) |
| :---- | :--------- | :----- | :----------- | :------------ | -------------------------: |
| LLaMA 70B | 64 | 4 | 128 | 128 | 1,000 |
## Low Latency<sup>**</sup>
All data was generated using version 0.9.0
### H100 GPUs (FP8)
| Model | Batch Size | TP (1) | Input Length | 1st Token Latency (ms) |
| :---- | :--------- | :----- | :----------- | ---------------------: |
| LLaMA 70B | 1 | 4 | 128 | 1.0 |
### A100 GPUs (FP16)
| Model | Batch Size | TP (1) | Input Length | 1st Token Latency (ms) |
| :---- | :--------- | :----- | :----------- | ---------------------: |
| LLaMA 7B | 1 | 1 | 128 | 10.0 |
|  |  |  |  |  |
| Mixtral 8x7B | 1 | 2 | 128 | 20.0 |
| LLaMA 70B | 1 | 4 | 128 | 30.0 |
| LLaMA 70B | 1 | 8 | 2048 | 300.0 |
| Falcon 180B | 1 | 8 | 128 | 40.0 |
| Falcon 180B | 1 | 8 | 2048 | 400.0 |

(1) TP stands for Tensor Parallelism.
## Known Issues
| GPT-J 6B | 1 | 8 | 128 | 9.0 |
"""


def test_the_trtllm_page_gives_its_a100_rows_at_tp_above_1_one_case_per_model_and_tp(tmp_path):
    m = _script()
    page = tmp_path / "performance.md"
    page.write_text(PAGE)
    cases = m.trtllm_perf_cases(page)
    got = {(c["model"], c["tp"]): [(p["prompt"], p["ttft_ms"]) for p in c["points"]] for c in cases}
    assert got == {("llama2-70b", 4): [(128, 30.0)], ("llama2-70b", 8): [(2048, 300.0)],
                   ("falcon-180b", 8): [(128, 40.0), (2048, 400.0)]}
    assert {c["source"] for c in cases} == {"trtllm-v0.9-a100"} and {c["gpu"] for c in cases} == {"a100"}
    # no count per case: this release runs each model as its shape says (Falcon's parallel block reduced once)
    assert [c.get("allreduces_per_layer") for c in cases] == [None, None, None]
    out = tmp_path / "prefill.json"
    out.write_text(json.dumps({"ttft_cases": [{"source": "trtllm-v0.9-a100", "model": "stale"},
                                              {"source": "splitwise", "model": "kept"}]}))
    m.main(["x", "--trtllm-perf", str(page), str(out)])
    assert [c["model"] for c in json.loads(out.read_text())["ttft_cases"]] == ["llama2-70b", "llama2-70b",
                                                                               "falcon-180b", "kept"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("| Falcon 180B | 1 | 8 | 128 |", "| Grok 1 | 1 | 8 | 128 |"), "neither mapped nor left out"),
    (lambda t: t.replace("version 0.9.0\n### H100", "version 0.10.0\n### H100"), "does not say"),
    (lambda t: t.replace("### A100 GPUs (FP16)\n| Model | Batch Size | TP (1) | Input Length | 1st",
                         "### A100 GPUs (FP8)\n| Model | Batch Size | TP (1) | Input Length | 1st"), "no '### A100"),
    (lambda t: t.replace("| Falcon 180B | 1 | 8 | 2048 | 400.0 |", "| Falcon 180B | 1 | 8 | 2K | 400.0 |"),
     "row '| Falcon 180B | 1 | 8 | 2K | 400.0 |'"),
    (lambda t: t.replace("| LLaMA 70B | 1 | 4 | 128 | 30.0 |", "| LLaMA 70B | 1 | 4 | 128 | 30.0 ms |"),
     "expected batch, TP and input length as integers"),
])
def test_a_changed_trtllm_page_is_one_line_not_silently_fewer_rows(tmp_path, edit, message):
    m = _script()
    page = tmp_path / "performance.md"
    page.write_text(edit(PAGE))
    with pytest.raises(SystemExit, match=re.escape(message)):
        m.trtllm_perf_cases(page)


def test_a_missing_trtllm_page_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        _script().trtllm_perf_cases(tmp_path / "performance.md")


def test_a_rebuilt_vidur_case_has_the_shipped_case_s_fields(tmp_path):
    """The shipped gemm cases name each model's architecture (phi-2's parallel block is read from it); a rebuild must
    write it too (found in review: it was added to the data file by hand, so a rebuild dropped it)."""
    m = _script()
    shipped = json.loads((REPO / "tiersim" / "data" / "public-prefill-profiles.json").read_text())["gemm_cases"]
    phi = next(c for c in shipped if c["model"] == "phi-2" and c["gpu"] == "a100")
    mlp = tmp_path / "data" / "profiling" / "compute" / "a100" / "microsoft" / "phi-2" / "mlp.csv"
    mlp.parent.mkdir(parents=True)
    columns = {"num_tensor_parallel_workers": 1, "num_tokens": 128, "n_embd": 2560, "n_head": 32, "n_kv_head": 32,
               "n_expanded_embd": 10240, "use_gated_mlp": False, "vocab_size": 51200,
               **{f"time_stats.{o}.median": 0.01 for o in m.GEMMS + m.SMALL}}
    mlp.write_text(",".join(columns) + "\n" + ",".join(str(v) for v in columns.values()) + "\n")
    (case,) = m.vidur_cases(tmp_path)
    assert list(case) == list(phi)
    assert {k: case[k] for k in phi if k != "ops"} == {k: phi[k] for k in phi if k != "ops"}


def test_too_few_arguments_are_the_usage_line(capsys):
    with pytest.raises(SystemExit, match="^usage: extract_public_prefill.py VIDUR_DIR"):
        _script().main(["extract_public_prefill.py", "vidur"])


def test_a_trtllm_row_of_another_batch_is_a_case_of_its_own(tmp_path):
    """Found in review: cases were keyed by (model, TP), so a batch-2 row joined the batch-1 case and was priced
    as one prompt."""
    m = _script()
    page = tmp_path / "performance.md"
    page.write_text(PAGE.replace("| LLaMA 70B | 1 | 4 | 128 | 30.0 |",
                                 "| LLaMA 70B | 1 | 4 | 128 | 30.0 |\n| LLaMA 70B | 2 | 4 | 128 | 35.0 |"))
    got = {(c["model"], c["tp"], c["sequences"]): [p["ttft_ms"] for p in c["points"]]
           for c in m.trtllm_perf_cases(page)}
    assert got[("llama2-70b", 4, 1)] == [30.0] and got[("llama2-70b", 4, 2)] == [35.0]
