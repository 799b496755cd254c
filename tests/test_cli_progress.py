"""The progress meter: a plain, rate-limited log line where stderr is not a terminal (pytest's is not)."""

import re

from tiersim.cli.progress import meter

LINE = re.compile(r"^work (\d+)/3\b")


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if LINE.match(line)]


def test_every_step_is_logged_with_detail_and_eta_when_due(capsys):
    with meter("work", 3, log_every=0) as progress:
        for i in range(3):
            progress.advance(f"item {i}")
    err = capsys.readouterr().err
    lines = _lines(err)
    assert [LINE.match(line).group(1) for line in lines] == ["1", "2", "3"]
    assert err.strip().splitlines() == lines  # nothing else: no final rich bar repeating the last line
    assert "item 0" in lines[0] and "eta" in lines[0] and "elapsed" in lines[0]
    assert "item 2" in lines[-1] and "eta" not in lines[-1]  # finished: no estimate left to give


def test_lines_are_rate_limited_but_the_end_is_always_logged(capsys):
    with meter("work", 3, log_every=3600) as progress:
        for _ in range(3):
            progress.advance()
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("work 3/3")
