"""An HTTP proxy for tests that sits in front of the S3 server and injects faults: for a chosen
fraction of requests (optionally only those whose path matches a pattern) it answers 503
SlowDown, 500 InternalError, resets the connection or drops it without an answer; it can delay
every request (a slow link) and freeze (accept requests and never answer, like a server stopped
with SIGSTOP) until thawed, and answer chosen requests itself (`answer`: a store's refusal, or what
a store's emulator never says). `counts` says what it has seen, so a test can wait for a request to
be under way (counts["delayed"]: requests that have begun a delay) instead of sleeping."""

import http.client
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")
EXPIRED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ExpiredToken</Code>'
           b"<Message>The provided token has expired.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}


FAULTS = ("slowdown", "internal", "reset")


class FaultProxy:
    def __init__(self, upstream: str, fail_fraction: float, seed: int = 0, delay_seconds: float = 0.0,
                 faults=FAULTS, fail_paths: str = "", delay_paths: str = ""):
        self.upstream = urlparse(upstream)
        self.delay_seconds = delay_seconds
        self.delay_paths = re.compile(delay_paths)  # only requests whose path matches are delayed
        self.revoked_keys: set[str] = set()  # access key ids answered with ExpiredToken
        self.answers: list[tuple[re.Pattern, int, bytes, dict]] = []  # (path pattern, status, body, headers): answer()
        self.fail_fraction = fail_fraction
        self.faults = faults  # chosen among at random: slowdown, internal, reset, drop
        self.fail_paths = re.compile(fail_paths)  # only requests whose path matches fail ("" matches all)
        self.thawed = threading.Event()  # cleared by freeze(): requests wait, unanswered, until thaw()
        self.thawed.set()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "slowdown": 0, "internal": 0, "reset": 0, "drop": 0, "expired": 0, "frozen": 0,
                       "delayed": 0, "answered": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered as botocore expects

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _error(self, status: int, payload: bytes, headers: dict | None = None):
                """A response of the proxy itself: an S3-style XML error unless told otherwise."""
                self.send_response(status)
                for k, v in (headers or {"Content-Type": "application/xml"}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _handle(self):
                body = self._body()
                delay = proxy.delay_seconds
                if delay > 0 and proxy.delay_paths.search(self.path):
                    with proxy.lock:
                        proxy.counts["delayed"] += 1  # counted as the delay begins: the request is under way
                    time.sleep(delay)
                if not proxy.thawed.is_set():
                    with proxy.lock:
                        proxy.counts["frozen"] += 1
                    proxy.thawed.wait()
                    self.close_connection = True  # like a frozen server's backlog: never answered
                    return
                answer = proxy.answer_for(self.path, self.headers.get("Authorization", ""))
                if answer:
                    return self._error(*answer)
                with proxy.lock:
                    failing = proxy.fail_paths.search(self.path) and proxy.rng.random() < proxy.fail_fraction
                    fault = proxy.rng.choice(list(proxy.faults)) if failing else None
                    proxy.counts[fault or "forwarded"] += 1
                if fault == "reset":  # RST instead of a response
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "drop":  # the connection closes with no answer at all
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault:
                    return self._error(503, SLOWDOWN) if fault == "slowdown" else self._error(500, INTERNAL)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, path_pattern: str, status: int, payload: bytes, headers: dict | None = None) -> None:
        """From now on, answer requests whose path (query included) matches `path_pattern` with
        `status`, `payload` and `headers` (a JSON body's Content-Type unless given), without
        forwarding them."""
        headers = headers or {"Content-Type": "application/json"}
        self.answers.append((re.compile(path_pattern), status, payload, headers))

    def answer_for(self, path: str, authorization: str) -> tuple[int, bytes, dict] | None:
        """(status, payload, headers) the proxy answers itself, counted: ExpiredToken for a
        revoked key, else the first answer() whose pattern matches the path; None: forward it."""
        if any(f"Credential={key}/" in authorization for key in self.revoked_keys):
            with self.lock:
                self.counts["expired"] += 1
            return 400, EXPIRED, {"Content-Type": "application/xml"}
        for pattern, status, payload, headers in self.answers:
            if pattern.search(path):
                with self.lock:
                    self.counts["answered"] += 1
                return status, payload, headers
        return None

    def freeze(self):
        self.thawed.clear()

    def thaw(self):
        self.thawed.set()

    def close(self):
        self.thaw()
        self.server.shutdown()
        self.server.server_close()
