"""Option groups (tiersim.options): one declaration, two front ends that agree with it and each other."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from tiersim.cli import options as typer_options
from tiersim.cli.app import parse_float_list, parse_int_list
from tiersim.cli.groups import CacheShape
from tiersim.cli.main import app
from tiersim.hierarchy.config import TierConfig
from tiersim.errors import TiersimError
from tiersim.options import add_arguments, from_namespace, list_values, option
from tiersim.validator.__main__ import parser as validator_parser
from tiersim.validator.options import ValidateOptions


def _params(command: str) -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def test_validator_front_ends_have_the_same_flags_defaults_and_help():
    cli = {name: p for name, p in _params("validate").items() if name not in ("help", "wide")}  # --wide: tables only
    actions = {a.dest: a for a in validator_parser()._actions if a.dest != "help"}
    assert set(cli) == set(actions) == {f.name for f in dataclasses.fields(ValidateOptions)}
    parsed = validator_parser().parse_args([])
    for name, param in cli.items():
        assert param.opts == actions[name].option_strings
        assert actions[name].help.startswith(param.help)
        lists = {"batch": parse_int_list, "context": parse_int_list, "hbm": parse_float_list}
        expected = lists[name](param.default, name) if name in lists else param.default
        assert getattr(parsed, name) == expected, name


def test_validator_argparse_converts_like_the_cli(capsys):
    args = validator_parser().parse_args(["--batch", "2,4", "--hbm", "0.5", "--steps", "3", "--out", "x.json"])
    assert (args.batch, args.hbm, args.steps, str(args.out)) == ([2, 4], [0.5], 3, "x.json")
    assert list_values(ValidateOptions(batch="2,4", hbm="0.5")) == {"batch": [2, 4], "context": [2048, 8192],
                                                                     "hbm": [0.5]}
    for bad in (["--context", "many"], ["--hbm", " , "]):
        with pytest.raises(SystemExit) as exc:
            validator_parser().parse_args(bad)
        assert exc.value.code == 2
        with pytest.raises(TiersimError) as cli_error:
            list_values(ValidateOptions(**{bad[0][2:]: bad[1]}))
        # the same words from both front ends: "--context: expected ..." / "argument --context: expected ..."
        assert capsys.readouterr().err.strip().endswith(f"argument {cli_error.value}")


@pytest.mark.parametrize("command", ["capture", "grid"])
def test_cache_structure_defaults_are_tier_configs(command):
    params, tier = _params(command), TierConfig()
    for name in ("sink_tokens", "recent_window", "retier_every", "compressed_bits", "fetch_share"):
        assert params[name].default == getattr(tier, name), name
    assert params["strategy"].default == tier.strategy


def test_grid_widens_the_strategy_help_for_its_comma_list():
    grid, capture = _params("grid")["strategy"].help, _params("capture")["strategy"].help
    assert "comma list" in grid and "comma list" not in capture
    assert grid.endswith(capture.split(": ", 1)[1])  # the strategies described once


@pytest.mark.parametrize("command", ["simulate", "capacity"])
def test_shared_groups_give_simulate_and_capacity_the_same_options(command):
    mine, other = _params(command), _params("capacity" if command == "simulate" else "simulate")
    for name in ("model", "model_config", "gpu", "trace", "lengths", "context", "prefetch", "steps", "seed",
                 "calibration", "profile", "host_floor"):
        assert (mine[name].opts, mine[name].default, mine[name].help) == (other[name].opts, other[name].default,
                                                                          other[name].help), name
    assert mine["host_floor"].secondary_opts == ["--no-host-floor"]


@dataclasses.dataclass(frozen=True)
class _Toy:
    size: int = option(3, "how many")
    label: str | None = option(None, "a name", flag="--name")
    fast: bool = option(False, "go fast")
    check: bool = option(True, "check", flag="--check/--no-check")


def test_a_group_becomes_typer_options_and_comes_back_as_one_instance():
    seen = []
    toy = typer.Typer()

    @toy.command()
    @typer_options.command(help={"size": "how many, here"})
    def run(before: int = typer.Option(1), group: _Toy = _Toy(), after: str = typer.Option("z")) -> None:
        seen.append((before, group, after))

    runner = CliRunner()
    assert runner.invoke(toy, ["--size", "5", "--name", "n", "--fast", "--after", "y"]).exit_code == 0
    assert runner.invoke(toy, []).exit_code == 0
    assert runner.invoke(toy, ["--no-check", "--before", "2"]).exit_code == 0
    assert seen == [(1, _Toy(5, "n", True), "y"), (1, _Toy(), "z"), (2, _Toy(check=False), "z")]
    assert runner.invoke(toy, ["--no-fast"]).exit_code == 2  # a lone flag, as declared
    assert "how many, here" in runner.invoke(toy, ["--help"]).output
    assert runner.invoke(toy, ["--size", "x"]).exit_code == 2


def test_a_help_override_for_an_unknown_option_is_refused():
    with pytest.raises(TypeError, match="nope"):
        typer_options.command(help={"nope": "?"})(lambda group=_Toy(): None)


def test_argparse_front_end_of_a_group():
    p = argparse.ArgumentParser()
    add_arguments(p, _Toy)
    assert from_namespace(_Toy, p.parse_args([])) == _Toy()
    assert from_namespace(_Toy, p.parse_args(["--size", "7", "--name", "a", "--fast"])) == _Toy(7, "a", True)
    assert from_namespace(_Toy, p.parse_args(["--no-check"])) == _Toy(check=False)
    with pytest.raises(SystemExit):
        p.parse_args(["--no-fast"])


def test_cache_shape_builds_a_tier_config():
    shape = CacheShape(sink_tokens=2, strategy="hybrid", fetch_share=0.5)
    config = TierConfig(hbm=0.5, ddr=0.5, **shape.config_options())
    assert (config.sink_tokens, config.strategy, config.fetch_share, config.recent_window) == (2, "hybrid", 0.5, 64)
