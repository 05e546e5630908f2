"""The terminal and the log file of a command that starts Ray (``zsad run``, ``resume``, ``evaluate``).

Ray writes to the driver's stderr from many places: Python loggers (token authentication, Ray Data's
``execution finished`` lines), the C++ core worker (``core_worker.cc`` lines written straight to
file descriptor 2), the processes it starts (raylet, GCS: they inherit descriptor 2) and the worker
lines it forwards (``log_to_driver``). While a :class:`Console` is captured, descriptor 2 is the
command's log file, so all of that lands there and the terminal shows zsad's own lines, the progress
bar and the summary. With ``verbose`` the log file is also copied to the terminal as it grows, so the
user sees everything, in order, and the file still holds it.

The log file is local (a run's output may be object storage); :meth:`Console.keep` copies it into
the run folder when the command ends (``RUN/logs/<attempt>.log``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import tempfile
import threading
from typing import Any, Iterator, TextIO


def _stamp() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Console:
    """zsad's lines (:meth:`say`, :meth:`error`) and, while :meth:`captured`, everything else
    written to standard error, which goes to :attr:`log_path` (and, ``verbose``, on to the terminal).

    ``quiet``: :meth:`say` writes to the log only (errors still reach the terminal)."""

    def __init__(self, *, verbose: bool = False, quiet: bool = False) -> None:
        if verbose and quiet:
            raise ValueError("quiet and verbose cannot be used together")
        self.verbose, self.quiet = verbose, quiet
        self.log_path: str | None = None
        self.keep_at: str | None = None  # where the command wants the log copied (see keep)
        self._terminal: TextIO | None = None  # the real stderr while captured
        self._log: TextIO | None = None
        self._own_bytes = 0  # what zsad itself wrote to the log (the rest came from Ray)

    @property
    def terminal(self) -> TextIO:
        """Where the user sees zsad's lines: the real standard error, also while it is captured."""
        return self._terminal or sys.stderr

    @property
    def progress_stream(self) -> TextIO | None:
        """Where a progress bar may be drawn: the terminal, unless quiet; with ``verbose`` None
        (progress then comes as plain lines through :meth:`say`, in order with Ray's lines)."""
        return None if self.quiet or self.verbose else self.terminal

    def _write_log(self, text: str) -> None:
        if self._log is not None:
            data = "".join(f"{_stamp()} {line}\n" for line in text.splitlines())
            self._log.write(data)
            self._log.flush()
            self._own_bytes += len(data.encode("utf-8", "backslashreplace"))

    def _show(self, text: str) -> None:
        """To the terminal; while verbose and captured, the log's copy reaches the terminal instead."""
        if not (self.verbose and self._log is not None):
            print(text, file=self.terminal, flush=True)

    def say(self, message: str) -> None:
        """One of zsad's progress lines: ``[zsad] message``."""
        text = f"[zsad] {message}"
        self._write_log(text)
        if not self.quiet:
            self._show(text)

    def error(self, message: str) -> None:
        """An error for the user: ``zsad: message``, on the terminal even when quiet."""
        text = f"zsad: {message}"
        self._write_log(text)
        if self.verbose and self._log is not None:
            self._show(text)
        else:
            print(text, file=self.terminal, flush=True)

    def foreign_output(self) -> bool:
        """Whether anything other than zsad's own lines reached the log (Ray's output)."""
        return bool(self.log_path) and os.path.getsize(self.log_path) > self._own_bytes

    @contextlib.contextmanager
    def captured(self, prefix: str = "zsad") -> Iterator["Console"]:
        """Send descriptor 2 to a new local log file for the block (see the module doc).

        Where standard error is not a real descriptor (a test's in-process runner), nothing is
        redirected and the log holds zsad's own lines only."""
        fd, self.log_path = tempfile.mkstemp(prefix=f"{prefix}-", suffix=".log")
        os.close(fd)
        self._log = open(self.log_path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
        self._own_bytes = 0
        try:
            real = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):
            real = False
        if not real:
            try:
                yield self
            finally:
                self._log.close()
                self._log = None
            return
        sys.stderr.flush()
        # the workers' lines without colour codes in a file (Ray reads this when it prints them)
        colour = os.environ.get("RAY_COLOR_PREFIX")
        if not self.verbose:
            os.environ["RAY_COLOR_PREFIX"] = "0"
        saved = os.dup(2)
        self._terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        os.dup2(self._log.fileno(), 2)
        tail = _Tail(self.log_path, self._terminal) if self.verbose else None
        try:
            yield self
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if colour is None:
                os.environ.pop("RAY_COLOR_PREFIX", None)
            else:
                os.environ["RAY_COLOR_PREFIX"] = colour
            if tail is not None:
                tail.stop()
            self._terminal.close()
            self._terminal = None
            self._log.close()
            self._log = None

    def keep(self, dest_uri: str, storage: dict[str, Any] | None = None) -> str | None:
        """Copy the log file to ``dest_uri`` (local or object storage) and remove the local one.

        Returns None when copied; else a line saying where the log stayed and why."""
        from pipeline.io import fs as fsio

        if not self.log_path or not os.path.exists(self.log_path):
            return None
        try:
            fs_, path = fsio.filesystem(dest_uri, storage)
            parent = path.rsplit("/", 1)[0]
            if parent:
                fs_.makedirs(parent, exist_ok=True)
            fs_.put_file(self.log_path, path)
        except Exception as exc:
            return f"the log stays at {self.log_path} (not copied to {dest_uri}: {type(exc).__name__}: {exc})"
        os.unlink(self.log_path)
        self.log_path = None
        return None

    def discard(self) -> str | None:
        """After a command that kept no log: remove the local log if it holds only zsad's own
        lines (they were shown); else keep it and return a line saying where it is."""
        if not self.log_path or not os.path.exists(self.log_path):
            return None
        if self.foreign_output():
            return f"Ray's output of this command is in {self.log_path}"
        os.unlink(self.log_path)
        self.log_path = None
        return None


class _Tail:
    """Copies what is appended to a file to a stream, from a thread, until :meth:`stop` (which
    copies the rest)."""

    def __init__(self, path: str, out: TextIO, interval_s: float = 0.1) -> None:
        self._file = open(path, "rb")
        self._out = out
        self._interval = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zsad-log-tail", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        data = self._file.read()
        if data:
            self._out.write(data.decode("utf-8", "backslashreplace"))
            self._out.flush()

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval):
            self._copy()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self._copy()
        self._file.close()
