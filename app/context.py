"""Helpers shared by CLI commands."""

from __future__ import annotations

import typer

from app.settings import Settings


def settings_of(ctx: typer.Context) -> Settings:
    """The Settings built by the global callback (or from the environment when run bare)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings.from_env()
