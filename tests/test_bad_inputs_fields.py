"""Files of the right kind that parse but hold the wrong things (issue 26): one field of a valid input,
anywhere in it, replaced by any JSON value, for the report's inputs and every JSON input option. Refused
in one line or used; never a traceback."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cli_run import invoke
from test_bad_inputs_generated import (COMMANDS, INPUTS, SETTINGS, VALID_INPUT, _input_args,  # noqa: F401
                                       work)


# -- report inputs that parse but hold the wrong things -----------------------------------------------------------
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                          max_size=3), max_leaves=6)


@settings(max_examples=80, **SETTINGS)
@given(data=st.data())
def test_a_report_input_with_a_wrong_field_is_refused_or_drawn_never_a_crash(work, data):
    """A valid capacity, calibration or quality-grid file with one field (of one table row, or at the top)
    replaced by any JSON value:
    the report refuses it in one line (an expected error) or draws it; a field the figures plot holding
    something other than a number is refused."""
    from tiersim.cli.app import EXPECTED_ERRORS
    from tiersim.report.build import build_report
    from tiersim.report.loaders import TEXT_COLUMNS, load_input

    name = data.draw(st.sampled_from(["capacity.json", "calibration.json", "quality-grid.json"]))
    document = json.loads((work / name).read_text())
    tables = [k for k, v in document.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    table = data.draw(st.sampled_from(sorted(tables) + [None]))  # None: a top-level field
    value = data.draw(JSON_VALUES)
    if table is None:
        field = data.draw(st.sampled_from(sorted(set(document) - {"kind", "schema_version", *tables})))
        document[field] = value
        plotted = False
    else:
        row = data.draw(st.integers(0, len(document[table]) - 1))
        field = data.draw(st.sampled_from(sorted(document[table][row])))
        document[table][row][field] = value
        plotted = isinstance(document[table][0].get(field), (int, float)) and field not in TEXT_COLUMNS
    try:
        build_report([load_input(document)])  # the page as a string: every figure, key number and header
    except EXPECTED_ERRORS as exc:
        assert len(str(exc).splitlines()) <= 1, exc
        return
    number = value is None or isinstance(value, (int, float))
    assert number or not plotted or field not in _plotted_fields(), (table, field, value)


def _plotted_fields() -> set[str]:
    from tiersim.report.loaders import REQUIRED

    return {c for tables in REQUIRED.values() for columns in tables.values() for c in columns}


# -- JSON input files of the right kind with one field of the wrong type ---------------------------------------------
JSON_INPUTS = [(c, s) for c, s in INPUTS if VALID_INPUT.get(s.flag, "").endswith(".json") and s.flag != "INPUT"
               and not getattr(COMMANDS[c], "tiersim_loads_model", False)]


def _paths(document, prefix=()):
    """Every place in a JSON document (a list's first two items), for a mutation to land on."""
    if prefix:
        yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(document, list):
        for i, value in enumerate(document[:2]):
            yield from _paths(value, prefix + (i,))


@settings(max_examples=30, **SETTINGS)  # each accepted case runs its command: the hunt behind it ran 1,200
@given(data=st.data())
def test_a_json_input_with_a_wrong_field_is_refused_or_used_never_a_crash(work, data):
    """A valid calibration, profile or model config given to a command with any one field anywhere in it
    replaced by any JSON value: refused in one line naming the option, or used; never a traceback (the
    kind's declared shape, tiersim.fileformat.SHAPES, is checked by the one read)."""
    command, spec = data.draw(st.sampled_from(JSON_INPUTS))
    document = json.loads((work / VALID_INPUT[spec.flag]).read_text())
    place = data.draw(st.sampled_from(sorted(_paths(document), key=repr)))
    target = document
    for key in place[:-1]:
        target = target[key]
    target[place[-1]] = data.draw(JSON_VALUES)
    path = work / f"mutated-{command}-{spec.name}.json"
    path.write_text(json.dumps(document))
    code, out, err = invoke(_input_args(command, spec, path))  # an unexpected exception fails the test here
    assert "Traceback" not in err and code in (0, 2), (place, err[-300:])
    if code == 2:
        assert err.strip().splitlines()[-1].startswith("error:"), err
