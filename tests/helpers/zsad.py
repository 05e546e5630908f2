"""Running ``zsad`` in the tests: one helper for every test that runs the CLI in a subprocess.

- :func:`zsad` runs ``zsad ARGS`` from the repository root with the environment of the tests minus
  ``RAY_ADDRESS`` (a test never attaches to a Ray it did not start), and returns the
  ``CompletedProcess`` (text output captured).
- A ``run``, ``resume`` or ``evaluate`` runs on the in-process executor (``--executor local``) unless the test
  passes ``ray=True``: Ray is started only where Ray is what a test checks (each such test says
  why in one line). ``run`` also writes no HTML report unless the test sets ``report.enabled``
  itself (the report has its own tests in tests/e2e/test_report.py).
- :data:`TINY` is the switch that puts a preset on the tiny random-weight models (``--tiny``,
  :func:`pipeline.config.tiny_overrides`); tests add their own ``--set`` after it where they need
  other sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ZSAD = str(Path(sys.executable).with_name("zsad"))
REPO = Path(__file__).resolve().parents[2]
TINY = ("--tiny",)


def env_without_ray(extra: dict[str, str] | None = None, inherit: bool = True) -> dict[str, str]:
    """The tests' environment without RAY_ADDRESS, plus ``extra``; ``inherit=False``: ``extra`` alone."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} if inherit else {}
    env.update(extra or {})
    return env


def command(*args: str, ray: bool = False, report: bool = False) -> list[str]:
    """The ``zsad`` command line of ``args`` with the helper's defaults (executor, report)."""
    args = tuple(str(a) for a in args)
    if args and args[0] in ("run", "resume", "evaluate"):
        if not ray and "--executor" not in args:
            args = (*args, "--executor", "local")
        if args[0] == "run" and not report and not any("report.enabled" in a for a in args):
            args = (*args, "--set", "report.enabled=false")
    return [ZSAD, *args]


def zsad(*args: str, env: dict[str, str] | None = None, timeout: float = 600, ray: bool = False,
         report: bool = False) -> subprocess.CompletedProcess:
    """``zsad ARGS`` in a subprocess (see the module docstring for the defaults)."""
    return subprocess.run(command(*args, ray=ray, report=report), cwd=REPO, capture_output=True, text=True,
                          env=env_without_ray(env), timeout=timeout)


def popen(*args: str, ray: bool = False, report: bool = False, env: dict[str, str] | None = None, inherit: bool = True,
          **kwargs) -> subprocess.Popen:
    """``zsad ARGS`` started in the background (for tests that kill or race it); ``inherit=False``:
    the process gets ``env`` alone as its environment."""
    return subprocess.Popen(command(*args, ray=ray, report=report), cwd=REPO, env=env_without_ray(env, inherit), **kwargs)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``res`` after asserting it exited 0 (with its output's tail as the message)."""
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res
