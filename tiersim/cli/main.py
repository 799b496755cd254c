"""Console-script entry point: import every command module so it registers on the app."""

from __future__ import annotations

from tiersim.cli.app import app, run

# One line per command module; each registers its commands on `app` (help lists them in this order).
from tiersim.cli import cmd_simulate  # noqa: F401,E402  (simulate, capacity)
from tiersim.cli import cmd_serve  # noqa: F401,E402  (serve; capacity --qps)
from tiersim.cli import cmd_presets  # noqa: F401,E402
from tiersim.cli import cmd_capture  # noqa: F401,E402  (capture, synth)
from tiersim.cli import cmd_grid  # noqa: F401,E402
from tiersim.cli import cmd_validate  # noqa: F401,E402
from tiersim.cli import cmd_report  # noqa: F401,E402

from tiersim.cli.options import cover  # noqa: E402

cover(app)  # after every command registered: each checks its options and outputs before it runs (cli.options)


def main() -> None:
    run()


__all__ = ["app", "main"]
