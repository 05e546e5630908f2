"""Files that appear complete or not at all (the run folder's tables, manifests, choice files,
downloaded weights and parts, checkpoints, report pages).

Locally a file is written under a temporary name in its own folder and renamed over the final
name (``os.replace``, atomic on POSIX); on an object store one PUT is enough, since an object is
visible only when its upload completes. A failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from pipeline.io import fs as fsio
from pipeline.io.fs import StorageOptions


@contextlib.contextmanager
def local_target(path: str, mode: int | None = None) -> Iterator[str]:
    """A temporary path beside the local file ``path`` to write to; renamed onto ``path`` when the
    block ends without an exception, deleted otherwise. ``mode``: the file's permission bits (default:
    what a plain ``open`` would give under the current umask, not mkstemp's private 0600)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_target(uri: str, storage: StorageOptions | None = None, mode: int | None = None) -> Iterator[str]:
    """A local temporary path to write the whole file at ``uri`` into (for writers that want a path or
    a file of their own, or that stream more than memory should hold). Locally it is
    :func:`local_target`'s; for an object-store URI it is a temporary file uploaded in one PUT when the
    block ends without an exception. The temporary file is gone afterwards either way."""
    if not fsio.is_remote(uri):
        with local_target(fsio.local_path(uri), mode) as tmp:
            yield tmp
        return
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(uri.rstrip("/")))
    os.close(fd)
    try:
        yield tmp
        fs, path = fsio.filesystem(uri, storage)
        fs.put_file(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_atomic(uri: str, data: bytes, storage: StorageOptions | None = None) -> None:
    """``data`` as the whole file at ``uri`` (a local path or an object-store URI), atomically."""
    if fsio.is_remote(uri):
        fsio.write_bytes(uri, data, storage)
        return
    with local_target(fsio.local_path(uri)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
