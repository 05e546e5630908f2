"""Headless Chromium (Debian's ``chromium`` package) for tests of HTML pages: the DOM after the page
loaded, and a screenshot. ``.ci/run`` installs the package; a test skips, loudly, only when no
Chromium binary can be found at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# no sandbox (tests run as root in CI), no GPU, and none of the background connections that a closed
# network refuses; a new empty profile each time
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
]


def chromium() -> str:
    found = os.environ.get("ZSAD_CHROMIUM") or next((p for name in CANDIDATES if (p := shutil.which(name))), None)
    if not found:
        reason = (
            "NO CHROMIUM: the browser tests of the HTML report did NOT run. Install Debian's chromium package "
            "(apt-get install chromium; .ci/run does) or point ZSAD_CHROMIUM at a Chromium binary."
        )
        warnings.warn(reason)
        pytest.skip(reason)
    return found


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="zsad-chromium-") as profile:
        return subprocess.run(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=timeout
        )


def dump_dom(path: str, timeout: float = 120) -> str:
    """The serialised DOM of the local page ``path`` after it loaded."""
    done = _run(["--dump-dom", f"file://{os.path.abspath(path)}"], timeout)
    assert done.returncode == 0 and "<html" in done.stdout, (
        f"chromium --dump-dom failed ({done.returncode}): {done.stderr[-2000:]}"
    )
    return done.stdout


def screenshot(path: str, png: str, width: int = 1300, height: int = 1600, timeout: float = 120) -> str:
    """A PNG screenshot of the local page ``path`` (the top ``height`` pixels)."""
    done = _run([f"--window-size={width},{height}", f"--screenshot={png}", f"file://{os.path.abspath(path)}"], timeout)
    assert done.returncode == 0 and os.path.exists(png), (
        f"chromium --screenshot failed ({done.returncode}): {done.stderr[-2000:]}"
    )
    return png
