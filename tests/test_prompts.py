"""Prompt sets and answer scoring: the bundled problems, user JSONL files, answer extraction."""

import json
import re

import pytest

from tiersim.errors import TiersimError
from tiersim.prompts import Prompt, answers_match, extract_answer, load_prompts

NUMBER = re.compile(r"-?\d+(\.\d+)?")


def test_bundled_prompts_are_complete_and_scorable():
    prompts = load_prompts()
    assert len(prompts) >= 30
    assert len({p.id for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.answer and "Answer:" in p.prompt, p.id
        assert NUMBER.fullmatch(p.answer) or p.answer.isalpha(), p.id  # one number or one word
        # A model that writes the right answer the way the prompt asks is scored correct.
        assert answers_match(extract_answer(f"Let me work it out.\nAnswer: {p.answer}."), p.answer), p.id
    assert sum(bool(NUMBER.fullmatch(p.answer)) for p in prompts) >= 30  # numeric where possible


def test_bundled_categories():
    from importlib import resources

    lines = (resources.files("tiersim") / "data" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    categories = {json.loads(line)["category"] for line in lines if line.strip()}
    assert {"arithmetic", "units", "logic"} <= categories


def test_first_n_prompts():
    everything = load_prompts()
    assert load_prompts(n=4) == everything[:4]
    assert load_prompts(n=len(everything)) == everything
    with pytest.raises(TiersimError, match=f"holds {len(everything)} prompts"):  # not fewer without a word
        load_prompts(n=10_000)
    for bad in (0, -2):
        with pytest.raises(TiersimError, match=f"--n must be >= 1, got {bad}"):
            load_prompts(n=bad)


def test_user_file_defaults(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"prompt": "What is 6*7?", "answer": 42}\n'
        "\n"
        '{"id": "colour", "prompt": "Name a colour."}\n'
        '{"id": 7, "prompt": "2+2?", "answer": "4", "extra": "ignored"}\n'
    )
    assert load_prompts(str(path)) == [
        Prompt("1", "What is 6*7?", "42"),  # id = line number, numeric answer kept as text
        Prompt("colour", "Name a colour.", None),
        Prompt("7", "2+2?", "4"),
    ]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"prompt": "ok"}\n{"prompt": "cut off\n', "line 2 is not valid JSON"),
        ('{"question": "no prompt here"}\n', "line 1 has no 'prompt' text field"),
        ('{"prompt": "   "}\n', "line 1 has no 'prompt' text field"),
        ('["a", "list"]\n', "line 1 has no 'prompt' text field"),
        ('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "line 2 repeats id 'a'"),
        ("\n\n", "no prompts found"),
    ],
)
def test_bad_user_files_are_one_line_errors(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TiersimError) as exc_info:
        load_prompts(path)
    assert needle in str(exc_info.value) and "\n" not in str(exc_info.value)


def test_missing_file(tmp_path):
    with pytest.raises(TiersimError, match="prompts file not found: .*nope.jsonl"):
        load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("14 * 18 = 252, 252 - 197 = 55.\nAnswer: 55", "55"),
        ("Answer: $1,250.50", "1250.5"),
        ("Answer: 22.10 liters.", "22.1"),
        ("Answer: 40%", "40"),
        ("Answer: 3.0 kg", "3"),
        ("Answer: -4", "-4"),
        ("First guess. Answer: 10. Wait, that is wrong. Answer: 12", "12"),  # the last marker wins
        ("**Answer:** The green box.", "green"),
        ("Answer: It is Friday", "friday"),
        ("So the total is 63 km and then 5 more... 68", "68"),  # no marker: the last number
        ("It comes to 25.\nAnswer:", "25"),  # an empty marker falls back to the last number
        ("I do not know.", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "predicted, truth, expected",
    [
        ("10.5", "10.50", True),
        ("1250", "1,250", True),
        ("0.1", "0.10000000001", True),
        ("22", "22.1", False),
        ("friday", "Friday", True),
        ("ben", "Cara", False),
        ("7", "seven", False),
        (None, "1", False),
        ("1", None, False),
    ],
)
def test_answers_match(predicted, truth, expected):
    assert answers_match(predicted, truth) is expected
