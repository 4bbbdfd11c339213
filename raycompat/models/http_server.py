"""Serve an extractor over HTTP: POST a ``.npy`` uint8 batch, get ``.npy`` float32 features.

The wire format the HTTP adapter in :mod:`.extractor` speaks; ``raycompat
serve-extractor`` runs it so any model can stand behind a black-box endpoint.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from raycompat.errors import RaycompatError
from raycompat.models.extractor import NPY_MEDIA_TYPE, Extractor, npy_bytes, npy_load

log = logging.getLogger(__name__)


def make_server(extractor: Extractor, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering POSTs with ``extractor``'s features."""

    # One model call at a time: TorchScript modules are not safe to share across threads.
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            try:
                length = int(self.headers.get("Content-Length", 0))
                images = npy_load(self.rfile.read(length), "request")
                with lock:
                    body = npy_bytes(extractor(images))
            except RaycompatError as exc:
                self._reply(400, str(exc).encode(), "text/plain")
                return
            except Exception as exc:  # noqa: BLE001 - a server answers 500 rather than dropping the connection
                log.exception("extractor failed")
                self._reply(500, f"{type(exc).__name__}: {exc}".encode(), "text/plain")
                return
            self._reply(200, body, NPY_MEDIA_TYPE)

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("%s " + fmt, self.address_string(), *args)

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_thread(extractor: Extractor, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a daemon thread; returns the server and its URL. Call ``shutdown()`` to stop."""
    server = make_server(extractor, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/extract"
