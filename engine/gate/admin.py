"""The BFF's admin port: /metrics, /openapi.json and /healthz, apart from buyers.

Units sold and request rates are for the operator, not for the internet, so they
are served on `bff_admin_port` (on `metrics_host`, a private address by default)
by the process that supervises Granian's workers, from their shared prometheus
multiprocess directory. The public port answers 404 there. A busy admin port is
logged, not fatal: selling must not stop because a scrape endpoint could not bind.

A client gets as long to send its request here as on the public port
(`bff_header_timeout`, for the whole request, not per read): each connection holds
a thread, so one left half-sent must not hold it for good.
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from engine.config import Settings

log = logging.getLogger("seckill.bff.admin")


def _handler(openapi: bytes, header_timeout: float) -> type[BaseHTTPRequestHandler]:
    from engine.metrics import bff as bffmetrics

    class Admin(BaseHTTPRequestHandler):
        timeout = header_timeout  # each read (http.server sets it on the socket)

        def setup(self) -> None:
            super().setup()
            # ... and the whole request: a client trickling a byte per read is cut off too
            self.cutoff = threading.Timer(header_timeout, self._cut_off)
            self.cutoff.daemon = True
            self.cutoff.start()

        def _cut_off(self) -> None:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read returns
            except OSError:
                pass

        def parse_request(self) -> bool:
            parsed = super().parse_request()  # the request line and the headers read
            self.cutoff.cancel()
            return parsed

        def finish(self) -> None:
            self.cutoff.cancel()
            super().finish()

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self._get(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._get(body=False)

        def _not_allowed(self) -> None:
            """Every path here is read-only: 405 with its Allow header (a POST answered
            200 would tell a client its write went through)."""
            self.send_body = True
            self._answer(405, orjson.dumps({"error": f"method {self.command} not allowed "
                                            "here; use GET or HEAD"}),
                         "application/json", [("allow", "GET, HEAD")])

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

        def _get(self, *, body: bool) -> None:
            self.send_body = body
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, bffmetrics.render(), bffmetrics.CONTENT_TYPE)
            elif path == "/openapi.json":
                self._answer(200, openapi, "application/json")
            elif path == "/healthz":
                self._answer(200, b'{"status":"ok"}', "application/json")
            else:
                shown = path if len(path) <= 64 else f"{path[:64]}... ({len(path)} characters)"
                self._answer(404, orjson.dumps({"error": f"no such path: {shown}"}),
                             "application/json")

        send_body = True

        def _answer(self, status: int, body: bytes, ctype: str,
                    headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            for name, value in headers or []:
                self.send_header(name, value)
            self.end_headers()
            if self.send_body:
                self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return Admin


def start_admin(settings: Settings) -> ThreadingHTTPServer | None:
    """Serve the admin port in a daemon thread; None when it is off (0) or busy."""
    if not settings.bff_admin_port:
        return None
    from engine.gate.openapi import document

    try:
        server = ThreadingHTTPServer((settings.metrics_host, settings.bff_admin_port),
                                     _handler(orjson.dumps(document()),
                                              settings.bff_header_timeout))
    except OSError as exc:
        log.error("BFF admin port %s:%s unavailable, serving without it: %s",
                  settings.metrics_host, settings.bff_admin_port, exc,
                  extra={"event": "bff_admin_unavailable"})
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="bff-admin", daemon=True).start()
    return server
