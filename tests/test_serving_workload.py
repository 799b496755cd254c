"""tiersim.serving.workload: synthetic arrivals, request files and their one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tiersim.errors import TiersimError
from tiersim.serving import workload


def test_poisson_rate_and_lengths_follow_the_options():
    r = workload.synthetic(20_000, 5.0, 300, 4000, seed=1)
    gaps = np.diff(r.arrival)
    assert r.arrival[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() * 5.0 - 1) < 0.03  # rate 5/s
    assert abs(gaps.std() / gaps.mean() - 1) < 0.03  # exponential gaps: CV 1
    assert abs(r.output.mean() / 4000 - 1) < 0.02 and abs(r.prompt.mean() / 300 - 1) < 0.02


def test_gamma_burstiness_sets_the_coefficient_of_variation():
    r = workload.synthetic(20_000, 2.0, 100, 100, burstiness=3.0, seed=2)
    gaps = np.diff(r.arrival)
    assert abs(gaps.std() / gaps.mean() - 3.0) < 0.2
    assert abs(gaps.mean() * 2.0 - 1) < 0.1


def test_same_seed_same_requests_and_another_rate_keeps_the_lengths():
    a, b = workload.synthetic(500, 3.0, 200, 900, seed=7), workload.synthetic(500, 3.0, 200, 900, seed=7)
    assert np.array_equal(a.arrival, b.arrival) and np.array_equal(a.output, b.output)
    c = workload.at_rate(a, 6.0, seed=7)
    assert np.array_equal(c.output, a.output) and np.array_equal(c.prompt, a.prompt)
    np.testing.assert_allclose(c.arrival * 2, a.arrival, rtol=1e-12)  # the same gaps, half as long


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_request_file_round_trips_bit_for_bit(tmp_path, suffix):
    r = workload.synthetic(300, 1.7, 200, 900, burstiness=2.0, seed=3)
    path = workload.write_requests(tmp_path / f"w{suffix}", r)
    back = workload.read_requests(path)
    assert np.array_equal(back.arrival, r.arrival)
    assert np.array_equal(back.prompt, r.prompt) and np.array_equal(back.output, r.output)


@pytest.mark.parametrize("text, words", [
    ("", "no requests"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no requests"),
    ("arrival_s,prompt_tokens\n0,5\n", "missing column(s) output_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5,0\n", "output_tokens must be whole numbers"),
    ("arrival_s,prompt_tokens,output_tokens\n0,-5,3\n", "prompt_tokens must be whole numbers"),
    ("arrival_s,prompt_tokens,output_tokens\n0,2.5,3\n", "prompt_tokens must be whole numbers"),
    ("arrival_s,prompt_tokens,output_tokens\n1,5,3\n0,5,3\n", "must be sorted"),
    ("arrival_s,prompt_tokens,output_tokens\nnan,5,3\n", "must be finite"),
    ("arrival_s,prompt_tokens,output_tokens\n-1,5,3\n", "must be >= 0"),
    ("arrival_s,prompt_tokens,output_tokens\nx,5,3\n", "must be a number"),
])
def test_bad_request_files_are_one_line(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TiersimError) as info:
        workload.read_requests(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_bad_synthetic_options_are_refused():
    for kwargs in ({"qps": 0.0}, {"qps": -1.0}, {"qps": float("nan")}, {"burstiness": 0.0}):
        with pytest.raises(TiersimError):
            workload.synthetic(10, **{"qps": 1.0, "prompt_mean": 10, "output_mean": 10, **kwargs})
    with pytest.raises(TiersimError, match="expected a .csv"):
        workload.read_requests("x.txt")


@pytest.mark.parametrize("arrival, prompt, output, shown", [
    ([0.0, -5.0], [8, 8], [8, 8], "row 2 is -5"), ([0.0, float("nan")], [8, 8], [8, 8], "row 2 is nan"),
    ([1.0, 0.5], [8, 8], [8, 8], "row 2 (0.5) comes before row 1 (1)"), ([0.0, 1.0], [8, 2.5], [8, 8], "row 2 is 2.5"),
    ([0.0, 1.0], [8, 8], [0, 8], "row 1 is 0")])
def test_a_bad_request_value_is_shown_as_the_number(arrival, prompt, output, shown):
    with pytest.raises(TiersimError) as info:
        workload.check(arrival, prompt, output, "f.csv")
    assert shown in str(info.value) and "np." not in str(info.value)


# -- files that parse but would be misread (hostile probes) --------------------------------------------------
@pytest.mark.parametrize("name, text, words", [
    # one field more than the header: pandas took the first as the index and shifted the rest left
    # (arrival 8 s, output 9, read as valid)
    ("extra.csv", "arrival_s,prompt_tokens,output_tokens\n0,8,8,9\n", "not a readable csv"),
    ("bool.jsonl", '{"arrival_s": 0, "prompt_tokens": true, "output_tokens": 8}\n', "prompt_tokens must be numbers"),
    # a true among counts: pandas' inference made it 1
    ("mixed.jsonl", '{"arrival_s": 0, "prompt_tokens": 8, "output_tokens": 8}\n'
                    '{"arrival_s": 1, "prompt_tokens": true, "output_tokens": 8}\n', "row 2 is True"),
    ("far.csv", "arrival_s,prompt_tokens,output_tokens\n0,8,8\n1e30,8,8\n", "arrival_s must be at most"),
    ("twice.csv", "arrival_s,prompt_tokens,output_tokens,prompt_tokens\n0,8,8,100\n", "prompt_tokens appears more"),
])
def test_request_files_that_would_be_misread_are_refused(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TiersimError) as info:
        workload.read_requests(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_trailing_comma_still_reads():
    """index_col=False keeps what pandas' default accepted rightly: a trailing delimiter on every row."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.csv"
        path.write_text("arrival_s,prompt_tokens,output_tokens\n0,8,9,\n0.5,7,6,\n")
        r = workload.read_requests(path)
    assert r.arrival.tolist() == [0, 0.5] and r.prompt.tolist() == [8, 7] and r.output.tolist() == [9, 6]


@pytest.mark.parametrize("column", [
    pytest.param(lambda pa: pa.array([True, True]), id="bool"),
    # a timestamp read as nanoseconds since 1970 made 1 s arrive at 1e9 "s"
    pytest.param(lambda pa: pa.array([0, 1], pa.timestamp("s")), id="timestamp"),
])
def test_foreign_parquet_columns_that_are_not_numbers_are_refused(tmp_path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = "prompt_tokens" if column(pa).type == pa.bool_() else "arrival_s"
    table = {"arrival_s": pa.array([0.0, 1.0]), "prompt_tokens": pa.array([8, 8]), "output_tokens": pa.array([8, 8])}
    table[name] = column(pa)
    pq.write_table(pa.table(table), tmp_path / "r.parquet")
    with pytest.raises(TiersimError, match=f"{name} must be numbers"):
        workload.read_requests(tmp_path / "r.parquet")


def test_arrivals_past_the_clock_s_range_are_refused():
    """At 1e30 s every latency came out 0 (a millisecond step vanishes in float64 seconds there)."""
    with pytest.raises(TiersimError, match="past the 1e\\+09 s"):
        workload.synthetic(3, 1e-9, 8, 8)
    assert workload.synthetic(3, 1e-6, 8, 8).arrival[-1] < workload.MAX_ARRIVAL_S


def test_a_drawn_prompt_that_fills_the_context_keeps_one_output_token():
    """clip_to_context: an output is cut to what the context leaves after its prompt; a prompt that alone fills the
    context keeps context - 1 tokens and one output token (a request of no output is no request); one within it
    is untouched; an unknown context cuts nothing."""
    import numpy as np

    from tiersim.serving.workload import Requests, clip_to_context

    requests = Requests(np.zeros(3), np.array([100, 5000, 50]), np.array([9950, 10, 20]))
    cut, n, longest = clip_to_context(requests, 4096)
    assert (n, longest) == (2, 10050) and cut.prompt.tolist() == [100, 4095, 50]
    assert cut.output.tolist() == [3996, 1, 20] and "2 cut at the 4,096-token context" in cut.describe()
    assert clip_to_context(requests, None) == (requests, 0, 10050)
