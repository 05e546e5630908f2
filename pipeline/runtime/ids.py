"""Run ids: the folder name under OUTPUT and the Ray Jobs submission id. Light (no ray, no torch)."""

from __future__ import annotations

import datetime as dt
import re
import secrets

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_run_id(now: dt.datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx`` (UTC, random suffix)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str | None:
    """A message when ``run_id`` cannot be used, else None."""
    if not RUN_ID_RE.match(run_id):
        return (f"run id {run_id!r} is invalid: use letters, digits, '.', '_' or '-' "
                "(at most 128, starting with a letter or digit)")
    return None
