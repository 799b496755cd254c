"""`tiersim validate`: run the GPU validator (or its CPU smoke mode) and compare measured vs simulated."""

from __future__ import annotations

import shlex
import sys

from rich.table import Table

from tiersim.cli import options
from tiersim.cli.app import add_columns, app, compact_table, console, err_console
from tiersim.errors import TiersimError
from tiersim.options import list_values
from tiersim.validator.options import ValidateOptions


def _table(doc: dict) -> Table:
    from tiersim.validator import compare

    table = compact_table("measured vs simulated (calibrated closed form)")
    add_columns(table, compare.COLUMNS, optional=("sim stall ms", "H2D MB/step", "baseline ms", "prefetch GB/s",
                                                  "stall ms", "context"))
    for row in compare.rows(doc):
        table.add_row(*row)
    return table


def _show(doc: dict) -> None:
    from tiersim.validator import compare

    console.print(_table(doc))
    for line in compare.summary_lines(doc):
        console.print(line, highlight=False)


@app.command()
@options.command(example=["--device", "cpu", "--batch", "1", "--context", "8", "--hbm", "1", "--steps", "1",
                          "--warmup", "1"])
def validate(opts: ValidateOptions = ValidateOptions()) -> None:
    """Time decode steps with the TieredCache against all-in-HBM, sweep the host link, write a calibration
    (--executor graph: the step captured as a CUDA graph, the GPU-bound measurement)."""
    from tiersim.validator import calibrate
    from tiersim.validator import compare as compare_mod

    if opts.compare is not None:
        import dataclasses

        from tiersim.options import defaults
        from tiersim.validator.options import check_compare_alone

        check_compare_alone(opts.compare, dataclasses.asdict(opts), defaults(ValidateOptions))
        _show(compare_mod.load(opts.compare))
        return
    lists = list_values(opts)  # --batch, --context, --hbm, each a one-line error when it is not a list
    from tiersim.validator.options import executor_options

    extra = executor_options(opts.executor, opts.strategy, opts.fetch_share, opts.compressed,
                             opts.strategy_check)
    run = calibrate.run_validation
    if opts.executor == "graph":
        from tiersim.validator.graph_run import run_validation_graph as run
    try:
        doc = run(
            opts.model_shape, lists["batch"], lists["context"], lists["hbm"], device=opts.device, steps=opts.steps, warmup=opts.warmup,
            prefill=opts.prefill, out=opts.out, budget_s=opts.budget_s, sdpa=opts.sdpa, profile=opts.profile,
            command=shlex.join(["tiersim", *sys.argv[1:]]) if sys.argv[1:2] == ["validate"] else None,
            log=lambda msg: err_console.print(msg, highlight=False, markup=False), **extra,
        )
    except calibrate.NoDeviceError as exc:  # a usage error like any other: one `error:` line, exit 2
        raise TiersimError(str(exc).splitlines()[0]) from None
    _show(doc)
