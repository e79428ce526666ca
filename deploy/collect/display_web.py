"""``--display web``: the session's cues as a local web page (standard library ``http.server``).

Bound to 127.0.0.1 only: the page is for the patient's screen on the same
machine, or the operator's browser through an SSH tunnel
(``ssh -L 8765:127.0.0.1:8765 jetson``).  A request whose ``Host`` is not the
loopback address (DNS rebinding: another site's page asking our server) is
refused.  Served:

* ``/``: ``web/index.html``; ``/static/NAME``: the files of ``web/`` that ship
  with the package (no CDN, no network);
* ``/state``: the session's state as JSON (the same dict the terminal view
  draws), polled by the page several times a second.

The page draws the target posture and the live glove hand as SVG, per-channel
traces, the countdown and progress (web/collect.js).

Standard library only (Python 3.6: no ThreadingHTTPServer, hence the mix-in).
"""
import json
import os
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from neurohand.firmware_bridge.shared.errors import UsageError

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
#: What /static/ serves: these files of web/ and nothing else (no path ever reaches the file system).
STATIC_FILES = {"collect.js": "application/javascript; charset=utf-8",
                "collect.css": "text/css; charset=utf-8",
                "hand.js": "application/javascript; charset=utf-8"}
INDEX = "index.html"
LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765


def check_assets():
    """UsageError naming the missing file when the package was installed without its web assets."""
    for name in (INDEX,) + tuple(sorted(STATIC_FILES)):
        if not os.path.isfile(os.path.join(WEB_DIR, name)):
            raise UsageError("--display web: the page's file {!r} is missing from {} (the package was installed "
                             "without its web assets)".format(name, WEB_DIR))


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class WebDisplay(object):
    """Serve the page on 127.0.0.1:``port`` (0 = a free port); :meth:`show` publishes a new state."""

    def __init__(self, port=DEFAULT_PORT):
        self.port = int(port)
        self._lock = threading.Lock()
        self._state = {"phase": "starting"}
        self._version = 0
        self._server = None
        self._thread = None
        self.requests = 0

    def start(self):
        check_assets()
        display = self

        class Handler(_Handler):
            owner = display

        try:
            self._server = _Server((LOOPBACK, self.port), Handler)
        except OSError as exc:
            raise UsageError("--display web: cannot listen on {}:{} ({})".format(
                LOOPBACK, self.port, exc.strerror or exc)) from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="neurohand-collect-web", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self):
        return "http://{}:{}/".format(LOOPBACK, self.port)

    def show(self, state):
        with self._lock:
            self._state = state
            self._version += 1

    def state_json(self):
        with self._lock:
            state, version = self._state, self._version
        document = dict(state)
        document["version"] = version
        return json.dumps(document, allow_nan=False, separators=(",", ":")).encode("utf-8")

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(2.0)


class _Handler(BaseHTTPRequestHandler):
    owner = None
    server_version = "neurohand-collect"
    sys_version = ""

    def do_GET(self):
        owner = self.owner
        owner.requests += 1
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
        if host not in (LOOPBACK, "localhost"):
            self._send(403, b"forbidden\n", "text/plain; charset=utf-8")
            return
        path = self.path.split("?", 1)[0]
        if path == "/state":
            try:
                body = owner.state_json()
            except ValueError:    # a NaN in the state: a bug, but the page must keep polling
                body = b"{}"
            self._send(200, body, "application/json")
        elif path in ("/", "/index.html"):
            self._file(INDEX, "text/html; charset=utf-8")
        elif path.startswith("/static/") and path[len("/static/"):] in STATIC_FILES:
            name = path[len("/static/"):]
            self._file(name, STATIC_FILES[name])
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _file(self, name, content_type):
        with open(os.path.join(WEB_DIR, name), "rb") as handle:
            self._send(200, handle.read(), content_type)

    def _send(self, status, body, content_type):
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass   # the browser went away mid-answer

    def log_message(self, format, *args):
        pass   # a request line per poll would bury the session's own messages
