"""The wire: an HTTPS CONNECT proxy on 127.0.0.1 that terminates TLS itself.

A client told `HTTPS_PROXY=http://127.0.0.1:PORT` (requests, and so azure-core, msal's transport,
azure-storage-blob and mlflow; httpx) opens `CONNECT management.azure.com:443`; the proxy answers
200, then speaks TLS on the tunnel with a certificate for that very host from the test CA
(`ca.py`), which the client trusts through REQUESTS_CA_BUNDLE / SSL_CERT_FILE. Every request in
the tunnel goes to one `route(Request) -> Reply` function with the real host name, so the product
keeps its real endpoints and nothing resolves or leaves loopback.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.loopback import LoopbackServer
from tests.standin.ca import TestCA


@dataclass
class Request:
    method: str
    host: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def bearer(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else None


@dataclass
class Reply:
    status: int
    body: Any = None  # dict/list -> JSON; str -> text; bytes as is
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering

    def encoded(self) -> tuple[bytes, str | None]:
        if self.body is None:
            return b"", None
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return json.dumps(self.body).encode(), "application/json; charset=utf-8"


DROP = Reply(0, drop=True)


class _Tunnelled(BaseHTTPRequestHandler):
    """HTTP/1.1 inside one TLS tunnel (keep-alive: many requests per connection)."""

    protocol_version = "HTTP/1.1"
    host = ""
    route: Callable[[Request], Reply]

    def log_message(self, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        request = Request(self.command, self.host, parts.path, parse_qs(parts.query, keep_blank_values=True),
                          {k.lower(): v for k, v in self.headers.items()}, self._body())
        try:
            reply = self.route(request)
        except Exception as err:  # a bug in the stand-in: say so loudly, as a 500 the test will see
            import traceback

            traceback.print_exc()
            reply = Reply(500, {"error": {"code": "StandInBug", "message": f"{type(err).__name__}: {err}"}})
        if reply.drop:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        data, content_type = reply.encoded()
        if self.command == "HEAD":
            data_out = b""
        else:
            data_out = data
        self.send_response(reply.status)
        headers = {k.lower(): v for k, v in reply.headers.items()}
        if content_type and "content-type" not in headers:
            self.send_header("Content-Type", content_type)
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data_out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve


class Proxy:
    """`with Proxy(ca, route) as proxy:` then `proxy.url` is the HTTPS_PROXY value."""

    def __init__(self, ca: TestCA, route: Callable[[Request], Reply]):
        self.ca, self.route, self.url = ca, route, ""
        self.tunnels = 0

    def __enter__(self) -> Proxy:
        outer = self

        class Connect(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_CONNECT(self) -> None:
                host, _, port = self.path.rpartition(":")
                if port != "443":
                    self.send_error(403, "only port 443 is stood in")
                    return
                self.send_response(200, "Connection Established")
                self.end_headers()
                self.wfile.flush()
                try:
                    tls = outer.ca.context_for(host).wrap_socket(self.connection, server_side=True)
                except (ssl.SSLError, OSError):
                    self.close_connection = True
                    return
                outer.tunnels += 1

                class Inner(_Tunnelled):
                    pass

                Inner.host, Inner.route = host, staticmethod(outer.route)
                try:
                    Inner(tls, self.client_address, self.server)
                except (ssl.SSLError, OSError):
                    pass
                finally:
                    try:
                        tls.close()
                    except OSError:
                        pass
                self.close_connection = True

            def _plain(self) -> None:  # a client that skipped the proxy's tunnel: refuse loudly
                self.send_error(400, "the stand-in serves HTTPS through CONNECT only")

            do_GET = do_POST = do_PUT = do_DELETE = _plain

        self._loopback = LoopbackServer(Connect)
        self.url = self._loopback.url
        return self

    def __exit__(self, *exc: object) -> None:
        self._loopback.stop()
