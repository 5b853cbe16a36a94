"""A test server on loopback: a ThreadingHTTPServer on 127.0.0.1 at a free port, served from a
daemon thread, shut down and closed by `stop()`. The stand-ins (fake GitHub, the Azure proxy, the
small fakes of single services) all start and stop their servers through it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True  # a client that keeps its connection open never blocks stop()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
