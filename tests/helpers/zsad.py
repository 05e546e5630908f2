"""Running ``zsad`` in the tests: one helper for every test that runs the CLI.

- :func:`zsad` runs ``zsad ARGS`` from the repository root with the environment of the tests minus
  ``RAY_ADDRESS`` (a test never attaches to a Ray it did not start), and returns the
  ``CompletedProcess`` (text output captured).
- A ``run``, ``resume`` or ``evaluate`` runs on the in-process executor (``--executor local``) unless the test
  passes ``ray=True``: Ray is started only where Ray is what a test checks (each such test says
  why in one line). ``run`` also writes no HTML report unless the test sets ``report.enabled``
  itself (the report has its own tests in tests/e2e/test_report.py).
- Commands that start no Ray (a run, resume or evaluation on the in-process executor; validate,
  report, export-maps, compare, runs, schema) run in the test's own process through typer's
  ``CliRunner`` (the same ``app``, arguments, exit code, stdout and stderr; an uncaught exception
  becomes exit 1 with its traceback on stderr, as in a subprocess), so the suite pays the imports of
  torch and open_clip once per pytest worker instead of once per command. ``env`` is set for the
  call (a None value unsets a variable) and the working directory is the repository root.
  ``ZSAD_TESTS_SUBPROCESS=1`` runs every command in a subprocess instead (the same assertions hold
  either way). Ray runs, training and the commands a test starts in the background (:func:`popen`)
  are always subprocesses.
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


def env_without_ray(extra: dict[str, str | None] | None = None, inherit: bool = True) -> dict[str, str]:
    """The tests' environment without RAY_ADDRESS, plus ``extra`` (a None value removes the variable);
    ``inherit=False``: ``extra`` alone."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} if inherit else {}
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}


def command(*args: str, ray: bool = False, report: bool = False) -> list[str]:
    """The ``zsad`` command line of ``args`` with the helper's defaults (executor, report)."""
    args = tuple(str(a) for a in args)
    if args and args[0] in ("run", "resume", "evaluate"):
        if not ray and "--executor" not in args:
            args = (*args, "--executor", "local")
        if args[0] == "run" and not report and not any("report.enabled" in a for a in args):
            args = (*args, "--set", "report.enabled=false")
    return [ZSAD, *args]


#: commands that never start Ray (run, resume and evaluate only with --executor local)
NO_RAY = ("validate", "schema", "report", "export-maps", "compare", "runs")


def in_process(cmd: list[str]) -> bool:
    """Whether the ``zsad`` command line ``cmd`` runs in the test's process (it starts no Ray)."""
    if os.environ.get("ZSAD_TESTS_SUBPROCESS") or len(cmd) < 2:
        return False
    name, rest = cmd[1], cmd[2:]
    if name in NO_RAY:
        return True
    if name in ("run", "resume", "evaluate") and "--executor" in rest:
        return rest[rest.index("--executor") + 1] == "local" and "--address" not in rest
    return False


def _invoke(cmd: list[str], env: dict[str, str] | None) -> subprocess.CompletedProcess:
    """``cmd`` through typer's CliRunner in this process, as a CompletedProcess."""
    import traceback

    from typer.testing import CliRunner

    from pipeline.cli import app

    def clear_s3_clients() -> None:  # s3fs caches its filesystems: none from another test's settings
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()

    cwd = os.getcwd()
    os.chdir(REPO)
    clear_s3_clients()
    try:
        res = CliRunner().invoke(app, cmd[1:], env={"RAY_ADDRESS": None, **(env or {})})
    finally:
        os.chdir(cwd)
        clear_s3_clients()
    code, stderr = res.exit_code, res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        stderr += "".join(traceback.format_exception(res.exception))  # what the interpreter prints
        code = 1
    return subprocess.CompletedProcess(cmd, code, res.stdout, stderr)


def zsad(
    *args: str,
    env: dict[str, str | None] | None = None,
    timeout: float = 600,
    ray: bool = False,
    report: bool = False,
    here: bool | None = None,
) -> subprocess.CompletedProcess:
    """``zsad ARGS``, in this process when it starts no Ray, else in a subprocess (see the module
    docstring for the defaults). ``here=True``: in this process whatever the command, for a command
    the test knows is refused before Ray starts (a ``zsad train`` that its input or its run folder
    stops)."""
    cmd = command(*args, ray=ray, report=report)
    if (here and not os.environ.get("ZSAD_TESTS_SUBPROCESS")) or (here is None and in_process(cmd)):
        return _invoke(cmd, env)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env_without_ray(env), timeout=timeout)


def popen(
    *args: str,
    ray: bool = False,
    report: bool = False,
    env: dict[str, str] | None = None,
    inherit: bool = True,
    **kwargs,
) -> subprocess.Popen:
    """``zsad ARGS`` started in the background (for tests that kill or race it); ``inherit=False``:
    the process gets ``env`` alone as its environment."""
    return subprocess.Popen(
        command(*args, ray=ray, report=report), cwd=REPO, env=env_without_ray(env, inherit), **kwargs
    )


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``res`` after asserting it exited 0 (with its output's tail as the message)."""
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res
