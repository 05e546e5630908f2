"""Weights specs -> something a model builder can load.

A ``tag`` is passed through to open_clip. A ``path`` is checked (exists, optional sha256). A ``uri``
(``s3://``, ``https://``, any fsspec protocol) is fetched once per node into the weights cache:
``CACHE/<sha256(uri)[:16]>/<file name>``, under an exclusive file lock so concurrent actors on one
node download it once; the file is written to a temporary name and renamed into place only after
the optional sha256 check passed, so a half-written file is never used.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
from dataclasses import dataclass

from pipeline.config import WeightsSpec
from pipeline.errors import ZsadError
from pipeline.io.atomic import local_target
from pipeline.io.fs import StorageOptions, filesystem

DEFAULT_CACHE = "~/.cache/zsad/weights"


class WeightsError(ZsadError, RuntimeError):
    """Weights that cannot be fetched or fail their integrity check; the message names them."""

    exit_code = 2


@dataclass(frozen=True)
class ResolvedWeights:
    """What to hand to the model builder: ``tag`` (open_clip registry) or ``path`` (local file),
    neither for random init. ``sha256`` is the verified digest of ``path`` when it was checked."""

    tag: str | None = None
    path: str | None = None
    sha256: str | None = None


def cache_dir(configured: str | None = None) -> str:
    """The weights cache: the spec's ``weights_cache``, else $ZSAD_CACHE_DIR/weights, else ~/.cache/zsad/weights."""
    if configured:
        return os.path.expanduser(configured)
    env = os.environ.get("ZSAD_CACHE_DIR")
    if env:
        return os.path.join(os.path.expanduser(env), "weights")
    return os.path.expanduser(DEFAULT_CACHE)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_digest(path: str, expected: str | None, what: str) -> str | None:
    if not expected:
        return None
    got = sha256_file(path)
    if got.lower() != expected.lower():
        raise WeightsError(f"{what}: sha256 mismatch (expected {expected.lower()}, got {got})")
    return got


def fetch(uri: str, cache: str, sha256: str | None = None, storage: StorageOptions | None = None) -> str:
    """Fetch ``uri`` into ``cache`` once (locked) and return the local path."""
    name = posixpath.basename(uri.rstrip("/")) or "weights.bin"
    folder = os.path.join(cache, hashlib.sha256(uri.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, name)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if os.path.exists(target):
                try:
                    _check_digest(target, sha256, f"cached copy of {uri} at {target}")
                    return target
                except WeightsError:
                    os.remove(target)  # stale or corrupt cache entry: fetch again
            fs, path = filesystem(uri, storage)
            try:
                with local_target(target) as tmp:
                    fs.get_file(path, tmp)  # streamed by each filesystem's own download path
                    _check_digest(tmp, sha256, f"weights {uri}")
            except FileNotFoundError:
                raise WeightsError(f"weights {uri}: no such object") from None
            except WeightsError:
                raise
            except Exception as exc:
                raise WeightsError(f"weights {uri}: download failed: {exc}") from exc
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _local_file(path: str, what: str = "weights file") -> str:
    """``path`` with ``~`` expanded; a WeightsError when it is not an existing file."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{what} {path} does not exist")
    return path


def resolve(spec: WeightsSpec | None, cache: str | None = None, storage: StorageOptions | None = None,
            what: str = "weights file") -> ResolvedWeights:
    """Turn a weights spec into a tag or a verified local path (fetching URIs into the cache).
    ``what`` names the file in errors (other files fetched the same way: prompt files)."""
    if spec is None:
        return ResolvedWeights()
    if spec.tag:
        return ResolvedWeights(tag=spec.tag)
    if spec.path:
        path = _local_file(spec.path, what)
        return ResolvedWeights(path=path, sha256=_check_digest(path, spec.sha256, f"{what} {path}"))
    local = fetch(spec.uri, cache_dir(cache), spec.sha256, storage)
    return ResolvedWeights(path=local, sha256=spec.sha256.lower() if spec.sha256 else None)


def preflight(spec: WeightsSpec | None, storage: StorageOptions | None = None) -> None:
    """Cheap driver-side check before a run starts: the file or object exists. Tags are checked
    against open_clip's registry by :func:`pipeline.models.clip.check_model`."""
    if spec is None or spec.tag:
        return
    if spec.path:
        _local_file(spec.path)
        return
    fs, path = filesystem(spec.uri, storage)
    try:
        ok = fs.exists(path)
    except Exception as exc:
        raise WeightsError(f"weights {spec.uri}: cannot be reached: {exc}") from exc
    if not ok:
        raise WeightsError(f"weights {spec.uri}: no such object")
