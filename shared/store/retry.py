"""Retries for a remote store whose endpoint goes away for a while (a restart, a network cut).

Two layers. botocore retries each S3 request a few times within about a second (`_inner_s3_defaults`:
connection blips, 5xx, throttling). This layer outlasts an endpoint that is gone for seconds to a
minute: exponential backoff, bounded attempts and total time, one log line per retry naming the
operation, the path and the attempt. Only transient errors are retried (no connection, timeouts, 5xx and
throttling, a reply or request damaged in transit: see `transient`); a missing key on a live server, a
permission error or a checksum mismatch of stored data (SampleReadError) fail at once. Every retried
operation is idempotent: a whole-object GET or PUT (the same bytes again), a listing, a delete.

Configure it with `storage_options={"retry": {...}}` or, for processes started for you (DataLoader
workers, writer processes, head-train), the environment:

    ALPAMAYO_STORE_RETRY="attempts=8,first_delay_s=0.5,max_delay_s=10,budget_s=60"

When the budget runs out, the operation raises StoreUnavailableError (one line, naming the path);
nothing half-done is ever committed, so the store stays resumable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, fields, replace
from typing import Any

import zarr

from shared.store.format import StoreError

log = logging.getLogger("alpamayo.store")
ENV = "ALPAMAYO_STORE_RETRY"


class StoreUnavailableError(StoreError):
    """The store's endpoint did not answer within the retry budget: nothing is damaged, try again later.

    Never a SampleReadError: --skip-bad-samples must not skip a sample only because the server was away."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # tries of one operation, the first included
    first_delay_s: float = 0.5  # wait before the second try; doubled for each next one
    max_delay_s: float = 10.0  # cap of one wait
    budget_s: float = 60.0  # no retry starts after this much time on the operation (its tries and waits)

    @classmethod
    def resolve(cls, options: dict | None = None) -> RetryPolicy:
        """Defaults, then $ALPAMAYO_STORE_RETRY, then `options` (storage_options["retry"])."""
        names = {f.name: f.type for f in fields(cls)}
        p = cls()
        env = {k.strip(): v.strip() for k, _, v in (x.partition("=") for x in os.environ.get(ENV, "").split(",")) if k}
        for src, what in ((env, f"${ENV}"), (options or {}, "storage_options['retry']")):
            bad = sorted(set(src) - set(names))
            if bad:
                raise ValueError(f"{what}: unknown retry setting(s) {bad}; known: {sorted(names)}")
            try:
                p = replace(p, **{k: (int if names[k] == "int" else float)(v) for k, v in src.items()})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{what}: {e}") from None
        if p.attempts < 1 or p.first_delay_s < 0 or p.max_delay_s < 0 or p.budget_s < 0:
            raise ValueError(f"retry settings must be attempts >= 1 and times >= 0, got {p}")
        return p

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (1-based)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (attempt - 1))


# S3 error codes of a server that is busy, or of a request damaged on its way (the server's checksum of the
# body is not the one signed or sent: the same bytes sent again go through). s3fs retried the last two
# itself. Not here: RequestTimeTooSkewed (the local clock is 15 min off; waiting does not fix it, s3fs
# makes it a PermissionError), InvalidDigest (a malformed header), NoSuchKey and other 4xx.
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
                    "BandwidthLimitExceeded", "PriorRequestNotComplete", "XAmzContentSHA256Mismatch", "BadDigest"}
# botocore / aiohttp / fsspec classes (matched by name along the class's bases: none is imported here).
# ResponseParserError: a reply cut or garbled on its way (or a proxy's HTML page while throttling); s3fs
# retried it. A live server that speaks no S3 at all gives it too: retried to the budget, then one line.
_TRANSIENT_NAMES = {"ConnectionError", "HTTPClientError", "ReadTimeoutError", "ResponseStreamingError",
                    "IncompleteReadError", "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError",
                    "FSTimeoutError", "ResponseParserError"}
# botocore's check of a reply's checksum (FlexibleChecksumError; ChecksumError of the legacy retry handler):
# a mismatch is damage in transit; the same class also reports a checksum setting it does not know (permanent)
_CHECKSUM_NAMES = {"FlexibleChecksumError", "ChecksumError"}


def transient(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it was translated from) says the endpoint was away, not that data is wrong."""
    for _ in range(5):  # s3fs turns a 5xx into OSError(EBUSY / EREMOTEIO) with the ClientError as its cause
        if exc is None or isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError, StoreError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        resp = getattr(exc, "response", None)
        if type(exc).__name__ == "ClientError" and isinstance(resp, dict):  # botocore: the server answered
            code = str(resp.get("Error", {}).get("Code", ""))
            status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return status >= 500 or status == 429 or code in _TRANSIENT_CODES
        names = {c.__name__ for c in type(exc).__mro__}
        if _TRANSIENT_NAMES & names or (_CHECKSUM_NAMES & names and "did not match" in str(exc)):
            return True
        exc = exc.__cause__
    return False


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


class _Attempts:
    """The bookkeeping of one retried operation: log each retry once, give up past the policy."""

    def __init__(self, policy: RetryPolicy, what: str):
        self.policy, self.what, self.t0, self.n = policy, what, time.monotonic(), 0

    def wait_after(self, e: BaseException) -> float:
        """Seconds to sleep before the next try; raises `e` (not transient) or StoreUnavailableError (spent)."""
        if not transient(e):
            raise e
        self.n += 1
        spent = time.monotonic() - self.t0
        wait = self.policy.delay(self.n)
        if self.n >= self.policy.attempts or spent + wait > self.policy.budget_s:
            raise StoreUnavailableError(
                f"the store did not answer: {self.what} failed {self.n} time(s) over {spent:.1f} s ({_short(e)}); "
                f"retry budget: {self.policy.attempts} attempts, {self.policy.budget_s:g} s (${ENV})") from None
        log.warning("store: retry %d/%d in %.1f s: %s (%s)", self.n, self.policy.attempts - 1, wait, self.what, _short(e))
        return wait


def retry_call(policy: RetryPolicy, what: str, fn, *args, **kwargs) -> Any:
    """fn(*args, **kwargs), tried again on transient errors (see the module docstring)."""
    att = _Attempts(policy, what)
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - wait_after re-raises what is not transient
            time.sleep(att.wait_after(e))


async def aretry_call(policy: RetryPolicy, what: str, fn, *args, **kwargs) -> Any:
    """The same for a coroutine function (zarr's store calls run on its event loop)."""
    att = _Attempts(policy, what)
    while True:
        try:
            return await fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            await asyncio.sleep(att.wait_after(e))


class RetryingFS:
    """An fsspec filesystem whose IO calls are retried (`_IO`); everything else passes through."""

    _IO = frozenset({"exists", "isdir", "info", "ls", "find", "cat", "cat_file", "pipe_file", "rm", "mkdir", "put"})

    def __init__(self, fs, policy: RetryPolicy):
        self._fs, self.policy = fs, policy

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if name not in self._IO:
            return attr
        if name == "rm":
            return self._rm

        def call(*args, **kwargs):
            return retry_call(self.policy, f"{name} {_target(self._fs, args)}", attr, *args, **kwargs)
        return call

    def _rm(self, path, *args, **kwargs):
        """A delete whose answer was lost may find nothing left on its retry: that is success."""
        tries = []

        def once():
            tries.append(1)
            try:
                return self._fs.rm(path, *args, **kwargs)
            except FileNotFoundError:
                if len(tries) == 1:
                    raise
        return retry_call(self.policy, f"rm {_target(self._fs, (path,))}", once)


def _target(fs, args: tuple) -> str:
    if not args:
        return ""
    p = args[0]
    if isinstance(p, (list, tuple)):
        return f"{fs.unstrip_protocol(p[0])} (+{len(p) - 1} more)" if p else "[]"
    return fs.unstrip_protocol(str(p))


class RetryingStore(zarr.storage.WrapperStore):
    """A zarr store (one sample's directory on a remote store) whose gets and sets are retried."""

    def __init__(self, store: zarr.abc.store.Store, policy: RetryPolicy, url: str):
        super().__init__(store)
        self.policy, self.url = policy, url

    def with_read_only(self, read_only: bool = False) -> RetryingStore:
        return type(self)(self._store.with_read_only(read_only), self.policy, self.url)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        return await aretry_call(self.policy, f"GET {self.url}/{key}", self._store.get, key, prototype, byte_range)

    async def set(self, key: str, value: Any) -> None:
        await aretry_call(self.policy, f"PUT {self.url}/{key}", self._store.set, key, value)

    async def exists(self, key: str) -> bool:
        return await aretry_call(self.policy, f"HEAD {self.url}/{key}", self._store.exists, key)


def no_hidden_retries(fs) -> None:
    """s3fs retries timeouts and HTTP client errors 5 times itself (a class attribute, no option), silently:
    around botocore's tries, one attempt of this module against an endpoint that accepts and never answers
    took 5 x botocore tries x read_timeout (7.5 min with the defaults) before the budget was looked at.
    One try there: this module's budget and log lines govern."""
    if hasattr(fs, "retries") and type(fs).__module__.startswith("s3fs"):
        fs.retries = 1


def inner_s3_defaults(options: dict) -> dict:
    """S3 storage options with botocore's own per-request retries and timeouts, unless given: a few quick
    tries (standard mode) inside each of this module's attempts, and no 60 s hang on a dead endpoint."""
    ck = dict(options.get("config_kwargs") or {})
    if not {"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & set(os.environ):  # botocore reads those itself
        ck.setdefault("retries", {"max_attempts": 3, "mode": "standard"})
    ck.setdefault("connect_timeout", 5)
    ck.setdefault("read_timeout", 30)
    return {**options, "config_kwargs": ck}
