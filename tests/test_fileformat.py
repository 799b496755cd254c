"""tiersim.fileformat: the one owner of every file kind, its header and its checked read/write; and the
one-way layering the package keeps (an import running back up fails here)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tiersim import fileformat
from tiersim.errors import TiersimError, TraceError

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "tiersim"


def _table():
    return pd.DataFrame({"step": [0, 1, 2], "value": [0.5, 1.5, 2.5]})


@pytest.mark.parametrize("kind", [k for k in fileformat.KINDS.values() if "parquet" in k.containers])
def test_parquet_kinds_round_trip_with_their_header(tmp_path, kind):
    meta = {**fileformat.header(kind), "extra": {"a": [1, 2]}}
    path = fileformat.write_table(tmp_path / "x.parquet", _table(), meta)
    document, table = fileformat.read(path, [kind], label="x")
    assert document == meta
    pd.testing.assert_frame_equal(table.to_pandas(), _table())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kind", [k for k in fileformat.KINDS.values() if "json" in k.containers])
def test_json_kinds_round_trip_with_their_header(tmp_path, kind):
    doc = {**fileformat.stamp(kind), "rows": [{"a": 1}]}
    path = fileformat.write_document(tmp_path / "x.json", doc)
    assert fileformat.read(path, [kind], label="x") == (doc, None)


def test_every_refusal_is_one_line_naming_the_role_and_the_file(tmp_path):
    trace, grid = fileformat.TRACE, fileformat.QUALITY_GRID
    json_doc = tmp_path / "doc.json"
    plain = tmp_path / "plain.parquet"
    _table().to_parquet(plain)
    cases = [
        (tmp_path / "missing.json", [grid], "file not found"),
        (tmp_path, [grid], "is a directory"),
        (plain, [trace], "not a tiersim trace file (Parquet without tiersim metadata)"),
        ({"kind": "capacity", "schema_version": 1}, [grid], "not a tiersim quality-grid file (kind 'capacity')"),
        ({"kind": "capacity", "schema_version": 1}, [grid, trace], "not a tiersim quality-grid or trace file"),
        ({"schema_version": 1}, [grid], "(kind None)"),
        ({"kind": "quality-grid", "schema_version": 2}, [grid], "quality-grid schema_version 2 is newer than this"),
        ({"kind": "quality-grid"}, [grid], "schema_version must be an integer, got None"),
        ({"kind": "quality-grid", "schema_version": True}, [grid], "schema_version must be an integer"),
        ({"kind": "quality-grid", "schema_version": 0}, [grid], "schema_version 0 is not one tiersim ever wrote"),
        ({"kind": "quality-grid", "schema_version": -3}, [grid], "schema_version -3 is not one tiersim ever wrote"),
        ([1, 2], [grid], "expected a JSON object with a 'kind', got list"),
        ("{not json", [grid], "neither Parquet nor valid JSON"),
        (b"PAR1 cut short", [grid], "not a readable Parquet file"),
        ({"kind": "trace", "schema_version": 1}, [trace], "is a trace in json; tiersim stores it as parquet"),
    ]
    for content, accepted, message in cases:
        path = content
        if not isinstance(content, Path):
            path = json_doc
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(TiersimError, match="^role: ") as err:
            fileformat.read(path, accepted, label="role")
        text = str(err.value)
        assert message in text and str(path) in text and "\n" not in text, (content, text)


def test_corrupt_parquet_metadata_and_the_callers_error_class(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "bad.parquet"
    table = pa.Table.from_pandas(_table()).replace_schema_metadata({fileformat.META_KEY: b"{oops"})
    pq.write_table(table, path)
    with pytest.raises(TraceError, match="tiersim metadata is corrupt"):
        fileformat.read(path, [fileformat.TRACE], label="trace", error=TraceError)


def test_a_hint_follows_a_refused_kind(tmp_path):
    path = fileformat.write_document(tmp_path / "c.json", fileformat.stamp(fileformat.CAPACITY))
    with pytest.raises(TiersimError, match=r"\(kind 'capacity'\); draw it instead$"):
        fileformat.read(path, [fileformat.SIMULATION], label="x", hints={"capacity": "draw it instead"})


def test_the_module_imports_without_pandas_or_pyarrow():
    """The validator (torch + numpy only) writes calibration and profile files through it."""
    code = ("import sys, tiersim.fileformat\n"
            "print(sorted(m for m in ('pandas', 'pyarrow', 'simpy', 'plotly', 'typer', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text(encoding="utf-8"))


def test_kind_names_and_schema_versions_are_written_only_in_fileformat():
    """No second definition: a kind string or a schema_version literal outside fileformat fails here."""
    kinds = set(fileformat.KINDS)
    found = []
    for name, tree in _modules():
        if name == "tiersim.fileformat":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if "schema_version" in keys:
                    found.append(f"{name}:{node.lineno} builds a header by hand")
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if node.value.value in kinds or any(getattr(t, "id", "") in ("META_KEY", "SCHEMA_VERSION", "KIND")
                                                    for t in node.targets):
                    found.append(f"{name}:{node.lineno} defines a kind, META_KEY or schema version")
    assert not found, found


# The layers, top to bottom; a module may import its own layer or any below it, never one above.
LAYERS = {
    "__main__": 7, "cli": 6, "validator": 5, "serving": 5, "simulator": 4, "traces": 3, "quality": 3, "models": 2,
    "hierarchy": 1, "report": 1, "cluster": 0, "prompts": 0, "compat": 0, "errors": 0, "atomic": 0,
    "fileformat": 0, "options": 0, "shapes": 0,
}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "tiersim":
        return None
    return 0 if len(parts) == 1 else LAYERS.get(parts[1], 0)  # tiersim.__version__ and the like: the root


def test_imports_only_run_down_the_layers():
    unplaced = [p.stem for p in PACKAGE.iterdir() if p.suffix == ".py" and p.stem not in (*LAYERS, "__init__")]
    unplaced += [p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
                 and p.name not in LAYERS]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"
    upward = set()
    for name, tree in _modules():
        here = _layer(name)
        for node in ast.walk(tree):  # function-level (lazy) imports count too
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                there = _layer(target)
                if there is not None and there > here:
                    upward.add(f"{name} imports {target}")
    assert not upward, sorted(upward)


def test_an_output_that_is_a_symlink_is_written_where_it_points_with_its_mode(tmp_path):
    """Renaming over a link replaced the link with a file beside it: the file it named kept the last run's
    results (silently stale), and a chmod 600 result came back 644."""
    import os
    import stat

    real = tmp_path / "results" / "capacity.json"
    real.parent.mkdir()
    fileformat.write_document(real, {**fileformat.header(fileformat.CAPACITY), "run": 1})
    real.chmod(0o600)
    link = tmp_path / "capacity.json"
    link.symlink_to(real)
    fileformat.write_document(link, {**fileformat.header(fileformat.CAPACITY), "run": 2})
    assert link.is_symlink() and json.loads(real.read_text())["run"] == 2
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["capacity.json", "results"] and os.listdir(real.parent) == ["capacity.json"]


def test_an_output_that_is_a_pipe_or_a_device_is_never_replaced(tmp_path):
    """The rename replaced the node itself: `out.parquet -> /dev/null` run as root would have replaced /dev/null
    with a result file (a FIFO stands in for the device here)."""
    import os

    from tiersim.atomic import WriteError

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "capacity.json"
    link.symlink_to(fifo)
    for target in (fifo, link):
        with pytest.raises(WriteError, match="is not a regular file"):
            fileformat.write_document(target, fileformat.header(fileformat.CAPACITY))
    assert fifo.is_fifo() and sorted(os.listdir(tmp_path)) == ["capacity.json", "pipe"]


def test_a_name_as_long_as_the_file_system_takes_is_written(tmp_path):
    """The temporary file is `.NAME.XXXXXXXX.tmp`: for a name within 14 bytes of NAME_MAX it failed with
    ENAMETOOLONG after the work, though the result's own name was valid."""
    from tiersim.atomic import name_max

    target = tmp_path / ("é" * ((name_max(tmp_path) - 5) // 2) + ".json")  # two bytes a character: cut by bytes
    assert len(str(target.name).encode()) <= name_max(tmp_path)
    fileformat.write_document(target, fileformat.header(fileformat.CAPACITY))
    assert json.loads(target.read_text())["kind"] == "capacity" and len(list(tmp_path.iterdir())) == 1


def _strict(text: str):
    """Parse as any non-Python JSON reader would: the bare words NaN / Infinity are refused."""
    def refuse(word):
        raise ValueError(f"not JSON: {word}")
    return json.loads(text, parse_constant=refuse)


def test_undefined_figures_are_written_as_strict_json_null_on_stdout_in_files_and_in_parquet_metadata(tmp_path):
    """Two one-token requests have no TPOT at all: its percentiles are undefined. Every writer (stdout, the
    Parquet header, JSON files) writes them null, and the report reads the file back and says n/a."""
    from cli_run import invoke

    requests = tmp_path / "one-token.jsonl"
    requests.write_text("".join(json.dumps({"arrival_s": t, "prompt_tokens": 64, "output_tokens": 1}) + "\n"
                                for t in (0.0, 0.1)))
    out = tmp_path / "serve.parquet"
    code, stdout, err = invoke(["serve", "--requests-file", str(requests), "--on-full", "queue", "--format", "json",
                                "--out", str(out)])
    assert code == 0, err
    run = _strict(stdout)["runs"][0]
    assert run["tpot_ms"] == {"p50": None, "p90": None, "p99": None, "mean": None} and run["within_slo"]
    import pyarrow.parquet as pq
    meta = _strict(pq.read_schema(out).metadata[fileformat.META_KEY].decode())
    assert meta["tpot_ms"]["p99"] is None and meta["ttft_ms"]["p99"] > 0
    from tiersim.atomic import write_json
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": float("-inf")}})
    assert _strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 1.5], "c": {"d": None}}
    code, _, err = invoke(["report", str(out), "--out", str(tmp_path / "r.html")])
    assert code == 0, err
    assert "TPOT p50 n/a / p99 n/a ms" in (tmp_path / "r.html").read_text()
