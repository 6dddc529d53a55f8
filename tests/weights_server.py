"""A fault-injecting HTTP server on 127.0.0.1 for the weights tests: static files, error codes, dropped
connections (with or without Content-Length, chunked bodies cut short), slow and trickling bodies, a server
that accepts and never answers, and enough of the Hugging Face Hub's ``resolve`` API for
``huggingface_hub.hf_hub_download`` (a Hub stand-in reached through ``HF_ENDPOINT``)."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    drop_after: int | None = None  # send the full Content-Length, then close after this many bytes
    delay_s: float = 0.0  # spread the body over about this long (to overlap concurrent clients)
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    chunked: bool = False  # Transfer-Encoding: chunked (drop_after then cuts it inside a chunk)
    silent: bool = False  # accept the request and never answer
    hang_up: int = 0  # read the first hang_up requests (HEAD or GET), then close without a word
    trickle_s: float = 0.0  # send one byte every trickle_s seconds
    fail_first: int = 0  # answer the first fail_first GETs with HTTP 500


class WeightsServer:
    """``server.add(path, Route(...))``; ``server.url(path)``; ``server.gets[path]`` counts GET requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.gets: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()  # HEAD and GET
        self.closing = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._respond(head=True)

            def do_GET(self) -> None:
                owner.gets[self.path.split("?")[0]] += 1
                self._respond(head=False)

            def _respond(self, head: bool) -> None:
                route = None if owner.closing.is_set() else owner.routes.get(self.path.split("?")[0])
                if route is None:
                    route = Route(b"not found", 404, headers={"X-Error-Code": "EntryNotFound"})
                if not head and owner.gets[self.path.split("?")[0]] <= route.fail_first:
                    route = Route(b"temporarily unavailable", 500)
                owner.requests[self.path.split("?")[0]] += 1
                if owner.requests[self.path.split("?")[0]] <= route.hang_up:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if route.silent:
                    owner.closing.wait(60)
                    self.close_connection = True
                    return
                self.send_response(route.status)
                if route.chunked and not head:
                    self.send_header("Transfer-Encoding", "chunked")
                elif route.content_length or head:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                for k, v in route.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if head:
                    return
                body = route.body if route.drop_after is None else route.body[: route.drop_after]
                if route.chunked:
                    self.wfile.write(b"%x\r\n" % len(route.body) + body)
                    if route.drop_after is None:
                        self.wfile.write(b"\r\n0\r\n\r\n")
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if route.trickle_s:
                    for i in range(len(body)):
                        if owner.closing.wait(route.trickle_s):
                            break
                        self.wfile.write(body[i : i + 1])
                        self.wfile.flush()
                    self.close_connection = True
                    return
                chunks = max(1, int(route.delay_s / 0.05))
                step = max(1, len(body) // chunks)
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    if route.delay_s:
                        self.wfile.flush()
                        time.sleep(0.05)
                self.wfile.flush()
                if route.drop_after is not None or not route.content_length:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False  # silent and trickling handlers end when closing is set
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    def url(self, path: str) -> str:
        return self.root + path

    def add_hub_file(self, repo: str, revision: str, commit: str, filename: str, body: bytes) -> None:
        """Serve ``body`` as ``filename`` of hub repo ``repo`` at ``revision`` (and at ``commit``)."""
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        for rev in {revision, commit}:
            self.routes[f"/{repo}/resolve/{rev}/{filename}"] = Route(body, headers=headers)

    def close(self, drain_s: float = 10.0) -> None:
        """Stop serving, once the Hub calls a test gave up on have ended (up to ``drain_s``).

        A Hub call given up at its deadline runs on in its thread (``deit-registry-download``), retrying with
        huggingface_hub's back-off. Against a closed port each refused connect makes huggingface_hub close the
        client every thread shares (``http_backoff`` -> ``close_session``), cutting a later test's download
        under it. So every path first answers 404, which ends those calls at their next try, and only then
        does the port close.
        """
        self.closing.set()  # silent and trickling handlers return; every request now gets 404
        give_up = time.monotonic() + drain_s
        for thread in threading.enumerate():
            if thread.name == "deit-registry-download":  # netlimits.run_with_deadline's worker
                thread.join(max(0.0, give_up - time.monotonic()))
        self.httpd.shutdown()
        self.httpd.server_close()
