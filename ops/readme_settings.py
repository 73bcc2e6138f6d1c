"""Rewrite the settings table in README.md from `app.settings.settings_table()`.

Run `make readme-settings` (or `python ops/readme_settings.py`) after adding a setting;
tests/unit/test_settings.py fails while the README table is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.settings import settings_table  # noqa: E402

BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def main() -> int:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
