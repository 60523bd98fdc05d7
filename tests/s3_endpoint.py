"""An S3 endpoint on loopback that can go away and come back: moto's ThreadedMotoServer, restarted.

What models "the endpoint went away for a few seconds and came back": `stop()` shuts moto's HTTP
listener down (werkzeug closes the listening socket, so new connections are refused; moto answers
every request with `Connection: close`, so no kept-alive connection outlives it), and `start()`
listens again on the same port. The buckets survive because moto keeps them in module-level backends
of this process, not in the listener: the same objects are served after the restart. A request in
flight when the listener stops is still answered (a graceful shutdown).

A process forked from this one (a DataLoader worker) closes its copy of the listening socket at once:
else the port would stay bound while the child lives, so a stopped endpoint would accept connections
and never answer, and its restart could not bind the port.

    with S3Endpoint() as s3:            # s3.options: storage_options for fsspec / Store.open
        s3.outage(2.0)                  # stop now, start again 2 s later (a background timer)
        s3.hang(2.0)                    # the same, but the port accepts connections and never answers

`hang` models a server that is up but stuck (or a black-holing proxy): connections succeed, requests
are read and never answered; only the client's read timeout ends them. The held connections are
closed when it ends, then moto listens again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref

_LIVE: weakref.WeakSet = weakref.WeakSet()  # endpoints of this process, for _drop_listeners_in_child


def _drop_listeners_in_child() -> None:
    for ep in list(_LIVE):
        srv = getattr(ep._server, "_server", None)  # moto's werkzeug server; its thread is not in the child
        for sock in (srv.socket if srv is not None else None, ep._hung):
            if sock is not None and sock.fileno() >= 0:
                os.close(sock.detach())


os.register_at_fork(after_in_child=_drop_listeners_in_child)


class S3Endpoint:
    def __init__(self, bucket: str = "kvcache"):
        from moto.server import ThreadedMotoServer

        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            os.environ.pop(k, None)
        os.environ.update(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
        self._lock = threading.Lock()
        self._timer: threading.Timer | threading.Thread | None = None
        self.up = False
        self.outages: list[tuple[float, float]] = []  # (stopped at, seconds) in time.monotonic()
        self._hung: socket.socket | None = None  # the listener of hang(), while it holds the port
        _LIVE.add(self)
        self.start()
        import s3fs

        # fsspec caches filesystems by their arguments: one made for an s3:// URL without storage options
        # (cache-build, head-train: the endpoint comes from the environment) would still reach an earlier
        # endpoint's port
        s3fs.S3FileSystem.clear_instance_cache()
        # moto's backends outlive this server (that is what makes a restart lose nothing), so a bucket of an
        # earlier endpoint in this process may still be there: start empty, and leave nothing behind
        self.bucket, self._fs = bucket, s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        if self._fs.exists(bucket):
            self._fs.rm(bucket, recursive=True)
        self._fs.mkdir(bucket)

    @property
    def options(self) -> dict:
        """storage_options reaching this endpoint. botocore tries each request once: the outage reaches the
        store's own retry layer, which the tests watch (the store's default gives botocore 3 quick tries)."""
        return {"endpoint_url": self.url, "key": "test", "secret": "test",
                "config_kwargs": {"retries": {"max_attempts": 1}}}

    def env(self) -> dict:
        """Environment for processes that open s3:// URLs without storage options (cache-build, head-train)."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> None:
        with self._lock:
            if not self.up:  # werkzeug closed the old listening socket; SO_REUSEADDR lets it bind again
                with socket.socket() as s:  # moto's start() waits forever when its thread cannot bind: fail here
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", self.port))
                self._server.start()
                self.up = True

    def stop(self) -> None:
        with self._lock:
            if self.up:
                self._server.stop()
                self.up = False

    def outage(self, seconds: float) -> None:
        """Stop now; start again after `seconds` (in the background). Returns at once."""
        self.stop()
        self.outages.append((time.monotonic(), seconds))
        self._timer = threading.Timer(seconds, self.start)
        self._timer.daemon = True
        self._timer.start()

    def hang(self, seconds: float) -> None:
        """Stop now; for `seconds` accept connections on the port and never answer; then start again."""
        self.stop()
        self.outages.append((time.monotonic(), seconds))
        lsock = socket.socket()
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("127.0.0.1", self.port))
        lsock.listen(64)
        lsock.settimeout(0.05)
        self._hung = lsock  # closed in a forked child too (_drop_listeners_in_child)

        def hold():
            held, end = [], time.monotonic() + seconds
            try:
                while time.monotonic() < end:
                    try:
                        held.append(lsock.accept()[0])  # read nothing, answer nothing
                    except TimeoutError:
                        pass
            finally:
                for c in held:
                    c.close()
                self._hung = None
                lsock.close()
                self.start()

        self._timer = threading.Thread(target=hold, daemon=True)
        self._timer.start()

    def wait_up(self) -> None:
        if self._timer is not None:
            self._timer.join()

    def close(self) -> None:
        if isinstance(self._timer, threading.Timer):
            self._timer.cancel()
        elif self._timer is not None:  # hang(): ends by itself within its seconds
            self._timer.join()
        self.start()
        self._fs.invalidate_cache()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        self._fs.rm(self.bucket, recursive=True)
        self.stop()

    def __enter__(self) -> S3Endpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
