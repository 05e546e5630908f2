"""A real HTTP server on 127.0.0.1 that fails the first requests for some paths: for the retry tests.

``FlakyServer(files, failures)`` serves ``files`` (path -> bytes). ``failures[path]`` is a list of
what the first requests for that path get, in order: an HTTP status (e.g. 503) or ``"reset"`` (the
connection is closed without an answer). Later requests get the file (404 for unknown paths).
``hits[path]`` counts the requests."""

from __future__ import annotations

import collections
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyServer:
    def __init__(self, files: dict[str, bytes], failures: dict[str, list] | None = None) -> None:
        self.files = dict(files)
        self.failures = {k: list(v) for k, v in (failures or {}).items()}
        self.hits: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _answer(self, body: bool) -> None:
                path = self.path.split("?", 1)[0]
                with owner._lock:
                    owner.hits[path] += 1
                    planned = owner.failures.get(path)
                    action = planned.pop(0) if planned else None
                if action == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if isinstance(action, int):
                    self.send_response(action)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = owner.files.get(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:  # clients hang up on purpose here
                pass

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FlakyServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
