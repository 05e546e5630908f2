"""pipeline.io.atomic: the one atomic-write helper, local and on an object store."""

from __future__ import annotations

import os
import stat

import fsspec
import pytest

from pipeline.io.atomic import file_target, local_target, write_atomic


def _leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".tmp-")]


def test_write_atomic_local_replaces_the_whole_file(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_atomic(str(target), b"one")
    write_atomic(str(target), b"two")
    assert target.read_bytes() == b"two" and not _leftovers(target.parent)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_local_target_leaves_nothing_on_failure_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), local_target(str(target)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and not _leftovers(tmp_path)
    with local_target(str(target), mode=0o600) as tmp, open(tmp, "wb") as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_file_target_uploads_once_to_an_object_store_and_cleans_up():
    fs = fsspec.filesystem("memory")
    uri = "memory://zsad-atomic-test/pages/index.html"
    with file_target(uri) as tmp:
        assert not fs.exists("/zsad-atomic-test/pages/index.html")  # nothing visible before the block ends
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("<html></html>")
    assert fs.cat_file("/zsad-atomic-test/pages/index.html") == b"<html></html>" and not os.path.exists(tmp)
    with pytest.raises(ValueError), file_target("memory://zsad-atomic-test/pages/other.html") as tmp:
        raise ValueError("no page")
    assert not fs.exists("/zsad-atomic-test/pages/other.html") and not os.path.exists(tmp)


def test_file_target_local_is_local_target(tmp_path):
    target = tmp_path / "x" / "page.html"
    with file_target(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(target.parent)
        with open(tmp, "w") as fh:
            fh.write("ok")
    assert target.read_text() == "ok" and not _leftovers(target.parent)
