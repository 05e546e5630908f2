"""moto's S3 server on loopback, for the tests that start their own (and for tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moto_command(port: int) -> list[str]:
    here = os.path.join(os.path.dirname(sys.executable), "moto_server")
    exe = here if os.path.exists(here) else shutil.which("moto_server")
    if exe:
        return [exe, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except (urllib.error.URLError, OSError):
        return False
