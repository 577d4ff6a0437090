"""A real HTTP file server on 127.0.0.1 (port 0, in a thread) with scripted failures.

``Server.fail[path] = [503, 503]`` makes the next two requests of ``path`` answer 503;
``Server.cut[path] = n`` makes the next request send only ``n`` bytes of the body (with the full
Content-Length) and close the connection. Range requests are honoured (206).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Server:
    """State of one served folder: request log and scripted faults."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.fail: dict[str, list[int]] = {}
        self.cut: dict[str, int] = {}
        self.url = ""

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            state.requests.append((path, self.headers.get("Range")))
            codes = state.fail.get(path)
            if codes:
                self.send_error(codes.pop(0))
                return
            file = state.root / path.lstrip("/")
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if path in state.cut:
                self.wfile.write(body[: state.cut.pop(path)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serve(root: Path) -> Iterator[Server]:
    """Serves ``root`` on 127.0.0.1 until the block ends."""
    state = Server(root)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
