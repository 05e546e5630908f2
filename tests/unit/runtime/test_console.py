"""The console of a command that starts Ray: what reaches the terminal, what goes to the log file.

Each case runs a small Python process whose standard error is a pipe (a real descriptor 2, as in a
terminal or a Ray Jobs driver), so the redirection itself is exercised; no Ray is started: the
"noise" is written the ways Ray writes it (a logger on sys.stderr, straight to descriptor 2, a
child process that inherited it, a print to sys.stderr)."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, logging, os, subprocess, sys
    from pipeline.runtime.console import Console

    verbose, quiet, dest = json.loads(sys.argv[1])
    console = Console(verbose=verbose, quiet=quiet)
    noise = logging.getLogger("noise")
    noise.addHandler(logging.StreamHandler(sys.stderr))
    with console.captured() as c:
        c.say("before the noise")
        noise.warning("LOGGER-LINE")
        os.write(2, b"FD-LINE\\n")
        subprocess.run([sys.executable, "-c", "import sys; print('CHILD-LINE', file=sys.stderr)"], check=True)
        print("PRINT-LINE", file=sys.stderr)
        c.error("an error")
        print("STDOUT-LINE")
        progress = c.progress_stream
    path = console.log_path
    note = console.keep(dest) if dest else console.discard()
    print(json.dumps({"path": path, "note": note, "progress": None if progress is None else "terminal",
                      "exists": os.path.exists(path)}))
    """
)
NOISE = ("LOGGER-LINE", "FD-LINE", "CHILD-LINE", "PRINT-LINE")


def _run(tmp_path, verbose=False, quiet=False, dest=None):
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([verbose, quiet, dest])], capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return res, out


def test_ray_output_goes_to_the_log_and_zsad_lines_to_the_terminal(tmp_path):
    dest = tmp_path / "run" / "logs" / "run-1.log"
    res, out = _run(tmp_path, dest=str(dest))
    assert res.stderr.splitlines() == ["[zsad] before the noise", "zsad: an error"]
    assert "STDOUT-LINE" in res.stdout  # standard output is left alone
    log = dest.read_text()
    lines = log.splitlines()
    assert [line for line in lines if any(n in line for n in NOISE)] == list(NOISE)  # all of it, in order
    assert lines[0].endswith(" [zsad] before the noise") and lines[-1].endswith(" zsad: an error")
    assert out["note"] is None and not out["exists"]  # copied, and the local file removed
    assert out["progress"] == "terminal"


def test_verbose_shows_everything_in_order_and_keeps_the_log(tmp_path):
    dest = tmp_path / "v.log"
    res, out = _run(tmp_path, verbose=True, dest=str(dest))
    shown = [line for line in res.stderr.splitlines() if line]
    expected = ["[zsad] before the noise", *NOISE, "zsad: an error"]
    assert [next(e for e in expected if e in line) for line in shown] == expected
    assert all(n in dest.read_text() for n in NOISE)
    assert out["progress"] is None  # plain lines, in order with Ray's


def test_quiet_keeps_errors_on_the_terminal(tmp_path):
    res, out = _run(tmp_path, quiet=True, dest=str(tmp_path / "q.log"))
    assert res.stderr.splitlines() == ["zsad: an error"]
    assert "before the noise" in (tmp_path / "q.log").read_text() and out["progress"] is None


def test_a_log_that_cannot_be_copied_stays_and_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res, out = _run(tmp_path, dest=str(blocker / "logs" / "run.log"))
    assert out["exists"] and out["note"].startswith(f"the log stays at {out['path']} (not copied to {blocker}")


def test_without_a_run_folder_the_log_stays_only_when_ray_wrote_to_it(tmp_path):
    res, out = _run(tmp_path)  # the script's noise is "Ray's output": kept and named
    assert out["exists"] and out["note"] == f"Ray's output of this command is in {out['path']}"


def test_quiet_and_verbose_together_are_refused():
    from pipeline.runtime.console import Console

    with pytest.raises(ValueError, match="quiet and verbose"):
        Console(verbose=True, quiet=True)


def test_an_in_process_stderr_without_a_descriptor_is_not_redirected(capsys):
    from pipeline.runtime.console import Console

    console = Console()
    with console.captured() as c:
        c.say("hello")
    assert capsys.readouterr().err == "[zsad] hello\n"
    assert console.discard() is None and console.log_path is None  # only zsad's own line: removed
