"""`python -m tiersim` is the `tiersim` command."""

from tiersim.cli.main import main

main()
