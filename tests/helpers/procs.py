"""Processes the tests start that outlive their parent (a killed driver's local Ray, `ray start`
daemons): found by a snapshot of the Ray processes before, and stopped by pid, never `ray stop`
(which would stop every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def ray_pids() -> set[int]:
    """Pids whose command line mentions ray (gcs_server, raylet, agents, ``ray::`` workers)."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray" in cmd:
            pids.add(int(pid))
    return pids


def _mine(pid: int, session: int | None, marker: bytes | None) -> bool:
    """Whether ``pid`` belongs to what a test started: its session (``start_new_session=True``
    gives the child's descendants the child's pid as session id; Ray changes process groups, not
    sessions) or a marker in its command line (a ``ray start`` cluster's temp dir)."""
    try:
        if session is not None and os.getsid(pid) != session:
            return False
        if marker is not None and marker not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
    except OSError:
        return False
    return True


def stop_new_ray_processes(before: set[int], grace_s: float = 5.0, session: int | None = None,
                           marker: str | None = None) -> None:
    """SIGTERM every Ray process that appeared since ``before`` (only those of ``session`` or whose
    command line holds ``marker``, when given, so a test never stops another suite's Ray), then
    SIGKILL what is left after ``grace_s``. Repeated until none is left, because a dying raylet may
    still spawn a worker."""
    mark = marker.encode() if marker else None
    time.sleep(1)
    for _ in range(3):
        new = {pid for pid in ray_pids() - before if _mine(pid, session, mark)}
        if not new:
            return
        for pid in new:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (ray_pids() & new):
            time.sleep(0.2)
        for pid in ray_pids() & new:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.5)
