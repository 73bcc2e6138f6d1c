"""`zhuge` commands: models (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(cli: typer.Typer) -> None:
    """Add this area's commands to the CLI."""
