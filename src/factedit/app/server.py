"""The app's HTTP side: Python's ThreadingHTTPServer serving one static page and JSON endpoints.

GET  /                   the page (static/index.html: HTML, CSS and JS in one file, nothing fetched elsewhere)
GET  /api/status         model, base fingerprint, number of edits, busy
GET  /api/progress       what the running action is doing (never waits for it)
GET  /api/history        the applied edits, in order
GET  /api/checkpoints    saved edits that can be loaded
POST /api/trace|edit|undo|save|load|compare   a JSON object in, a JSON object out
POST /api/continuations  {"id": i}: the greedy continuations of edit i's probes before and after it (the page
                         asks right after /api/edit answers, so the table shows before these are decoded)

A FacteditError is answered 400 {"error": message} with the message as is; anything else 500 with one line.
"""

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from factedit.app.state import App
from factedit.errors import FacteditError

log = logging.getLogger("factedit.app")
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_BODY = 100_000  # bytes of one request: far above any form, far below anything that could hurt


def handler_for(app: App) -> type:
    """A request handler class bound to `app` (http.server makes one instance per request)."""
    reads = {"/api/status": app.status, "/api/progress": lambda: app.progress.to_dict(),
             "/api/history": app.history_view, "/api/checkpoints": app.checkpoint_names}  # fmt: skip
    actions = {"/api/trace": app.trace, "/api/edit": app.edit, "/api/undo": lambda data: app.undo(),
               "/api/save": app.save, "/api/load": app.load, "/api/compare": app.compare,
               "/api/continuations": app.continuations}  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path in reads:
                self._answer(lambda: reads[path]())
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

        def do_POST(self):  # noqa: N802
            action = actions.get(self.path.split("?", 1)[0])
            if action is None:
                return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such action: {self.path}"})
            self._answer(lambda: app.call(action, self._body()))  # queued on the one model thread

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise FacteditError(f"the request is {length} bytes: keep the text under {MAX_BODY}")
            try:
                data = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                raise FacteditError("the request is not JSON") from None
            if not isinstance(data, dict):
                raise FacteditError("the request must be a JSON object")
            return data

        def _answer(self, produce) -> None:
            try:
                self._json(HTTPStatus.OK, produce())
            except FacteditError as error:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            except Exception as error:  # a bug: one line for the page, the traceback for the terminal
                log.exception("%s failed", self.path)
                text = f"internal error: {type(error).__name__}: {error}".splitlines()[0]
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": text})

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def make_server(app: App, host: str = "127.0.0.1", port: int = 8123) -> ThreadingHTTPServer:
    """A bound server (port 0: any free port, read it from server.server_address)."""
    server = ThreadingHTTPServer((host, port), handler_for(app))
    server.daemon_threads = True  # a slow request never keeps the process alive at Ctrl-C
    return server


def serve_in_thread(app: App, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a background thread; returns the server (call .shutdown()) and its base URL."""
    server = make_server(app, host, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}"
