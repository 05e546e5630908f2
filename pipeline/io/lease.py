"""The run folder's lease: one process works on a run at a time.

``RUN/_lease.json`` names its holder (host, pid, start, last heartbeat). It is created atomically:
``O_CREAT | O_EXCL`` on local disk, a conditional ``PutObject`` (``If-None-Match: *``) on S3, so of two
runs started with one run id only one gets it; the other fails with who holds it and since when.
The holder refreshes the heartbeat as its shards finish and removes the lease when the run ends.

A lease is *stale* when its holder is a process of this host that no longer exists, or when its
heartbeat is older than ``timeout_s`` (a holder on another host cannot be checked otherwise). Only
a resume may take over a stale lease; a new run never does.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from typing import Any

from pipeline.errors import ZsadError
from pipeline.io.fs import StorageOptions, filesystem, is_remote, join
from pipeline.io.sinks import read_json_if_exists, write_json

LEASE = "_lease.json"


class LeaseHeld(ZsadError, RuntimeError):
    """The run folder is leased by another process (``holder``: its lease)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _create(uri: str, text: str, storage: StorageOptions | None) -> bool:
    """Create ``uri`` holding ``text`` unless it exists; True when this call created it."""
    fs, path = filesystem(uri, storage)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return True
    bucket, _, key = path.partition("/")
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=text.encode(), IfNoneMatch="*")
    except FileExistsError:  # s3fs's translation of PreconditionFailed (412): the key exists
        return False
    fs.invalidate_cache(path)
    return True


def _alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the holder's process runs (None: it is on another host, so this cannot be told)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: dict[str, Any], timeout_s: float) -> bool:
    alive = _alive_here(holder)
    if alive is not None:
        return not alive
    beat = dt.datetime.fromisoformat(holder.get("heartbeat") or holder["started"])
    return (dt.datetime.now(dt.timezone.utc) - beat).total_seconds() > timeout_s


def describe(run_id: str, holder: dict[str, Any]) -> str:
    return (
        f"run {run_id} is in progress (since {holder.get('started')}, on {holder.get('host')} pid {holder.get('pid')})"
    )


class Lease:
    """The lease of one run folder, held by this process (see the module docstring)."""

    def __init__(self, run_dir: str, storage: StorageOptions | None = None) -> None:
        self.uri = join(run_dir, LEASE)
        self.storage = storage
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now(),
            "heartbeat": _now(),
            "token": uuid.uuid4().hex,
        }

    def acquire(self, run_id: str, *, takeover: bool = False, timeout_s: float = 3600.0) -> dict[str, Any] | None:
        """Take the lease. Returns the stale lease taken over (None when there was none). Raises
        :class:`LeaseHeld` when another process holds it (or holds a stale one and ``takeover`` is
        False)."""
        for _ in range(3):
            if _create(self.uri, json.dumps(self.info), self.storage):
                return None
            holder = read_json_if_exists(self.uri, self.storage)
            if holder is None:  # released in between: try again
                continue
            stale = is_stale(holder, timeout_s)
            if not (takeover and stale):
                if stale:
                    raise LeaseHeld(
                        f"run {run_id} was interrupted (its holder, {holder.get('host')} pid "
                        f"{holder.get('pid')}, is gone); continue it with --resume (or `zsad resume`)",
                        holder,
                    )
                raise LeaseHeld(describe(run_id, holder), holder)
            self._remove()
            if _create(self.uri, json.dumps(self.info), self.storage):
                return holder
        raise LeaseHeld(f"run {run_id}: its lease changed hands while it was being taken; try again", {})

    def heartbeat(self) -> None:
        """Refresh the heartbeat (only while the lease is still this process's)."""
        holder = read_json_if_exists(self.uri, self.storage)
        if holder is not None and holder.get("token") == self.info["token"]:
            self.info["heartbeat"] = _now()
            write_json(self.uri, self.info, self.storage)

    def release(self) -> None:
        """Remove the lease if it is still this process's (best effort: a lease left behind is stale)."""
        try:
            holder = read_json_if_exists(self.uri, self.storage)
            if holder is not None and holder.get("token") == self.info["token"]:
                self._remove()
        except Exception:  # the storage may be gone: the lease is then stale for the next attempt
            pass

    def _remove(self) -> None:
        fs, path = filesystem(self.uri, self.storage)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
