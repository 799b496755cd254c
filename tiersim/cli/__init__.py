"""Command-line interface (typer). Each command lives in its own module under this package."""
