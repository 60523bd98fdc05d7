"""A remote store whose endpoint goes away: the S3 server (moto on loopback, tests/s3_endpoint.py) stopped
and restarted mid-build and mid-read. Reads and writes are retried with backoff (shared/store/retry.py):
an outage inside the retry budget changes nothing (every sample once, bitwise equal); a longer one
stops with one line naming what failed, and a resume completes. Transient errors only: a missing key
on a live server is not retried."""

import logging
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3_endpoint import S3Endpoint  # noqa: E402
from test_store_ops import PROV, SPEC, assert_stores_equal, produce  # noqa: E402

from shared.store import (  # noqa: E402
    RetryPolicy,
    SampleReadError,
    Store,
    StoreError,
    StoreUnavailableError,
    StoreWriter,
    synthetic_sample,  # noqa: E402
)
from shared.store.retry import retry_call, transient  # noqa: E402

N = 8
FAST = {"attempts": 30, "first_delay_s": 0.1, "max_delay_s": 0.4, "budget_s": 15}  # outlasts the 1-2 s outages
SHORT = {"attempts": 3, "first_delay_s": 0.1, "max_delay_s": 0.2, "budget_s": 0.5}  # gives up inside them


@pytest.fixture(scope="module")
def s3():
    with S3Endpoint() as ep:
        yield ep


@pytest.fixture(scope="module")
def reference():
    with tempfile.TemporaryDirectory(prefix="remote-ref-") as d:
        produce(str(Path(d) / "c"), N, 0, 1)
        yield Store.open(str(Path(d) / "c"))


def opts(s3, retry):
    return {**s3.options, "retry": retry}


def retries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "alpamayo.store" and "retry" in r.getMessage()]


def assert_once_and_equal(url, s3, reference):
    st = Store.open(url, storage_options=s3.options)
    rep = st.verify()
    assert rep.ok and not rep.warnings, str(rep)
    assert not st._duplicates and len(st) == N and st.keys() == reference.keys()  # every sample exactly once
    assert_stores_equal(st, reference)


def write_with_outage(url, so, outage, after, processes=0):
    """N samples through one writer; `outage()` (the endpoint goes away) once `after` samples are queued."""
    w = StoreWriter.create(url, PROV, SPEC, mode="resume", storage_options=so, processes=processes)
    try:
        w.wait_ready()  # writer processes started: the outage lands on their writes, not on their start-up
        done = w.done_keys()
        for i in range(N):
            if i == after:
                outage()
            s = synthetic_sample(i, SPEC)
            if s.key not in done:
                w.write(s)
        w.close()
    finally:
        if not w._closed:
            w.__exit__(RuntimeError, None, None)


@pytest.mark.parametrize("processes", [0, 1])
def test_build_through_an_outage_commits_every_sample_once(s3, reference, caplog, capfd, processes):
    url = f"s3://kvcache/build-outage-{processes}"
    caplog.set_level(logging.WARNING, "alpamayo.store")
    write_with_outage(url, opts(s3, FAST), lambda: s3.outage(1.5), 3, processes)
    s3.wait_up()
    assert_once_and_equal(url, s3, reference)
    # each retry logged once, naming the object and the attempt (a writer process logs to its stderr)
    lines = retries(caplog) or [x for x in capfd.readouterr().err.splitlines() if x.startswith("store: retry")]
    assert lines and all(re.match(rf"store: retry \d+/29 in [\d.]+ s: \w+ s3://kvcache/build-outage-{processes}/", x)
                         for x in lines), lines[:3]
    assert any(x.startswith("store: retry 1/29 in 0.1 s: ") for x in lines), lines[:3]


def test_read_during_an_outage_is_bitwise_equal(s3, reference, caplog):
    url = "s3://kvcache/read-outage"
    produce(url, N, 0, 1, storage_options=s3.options)
    st = Store.open(url, storage_options=opts(s3, FAST))
    caplog.set_level(logging.WARNING, "alpamayo.store")
    got = {}
    for i, key in enumerate(st.keys()):
        if i == 2:
            s3.outage(1.0)
        got[key] = st.read(key)
    s3.wait_up()
    lines = retries(caplog)
    assert any("GET s3://kvcache/read-outage/samples/" in x for x in lines), lines[:3]
    for key, x in got.items():
        y = reference.read(key)
        assert torch.equal(x.k.view(torch.int16), y.k.view(torch.int16))
        assert torch.equal(x.v.view(torch.int16), y.v.view(torch.int16))
        assert torch.equal(x.hidden.view(torch.int16), y.hidden.view(torch.int16))


def test_outage_past_the_budget_is_one_line_and_resume_completes(s3, reference):
    url = "s3://kvcache/build-past-budget"
    with pytest.raises(StoreError) as e:
        write_with_outage(url, opts(s3, SHORT), lambda: s3.outage(3.0), 3)
    msg = str(e.value)
    assert "\n" not in msg and "the store did not answer" in msg and "s3://kvcache/build-past-budget" in msg
    assert "rerun with --resume" in msg
    s3.wait_up()
    st = Store.open(url, storage_options=s3.options)  # what was committed is whole
    assert st.verify().ok and len(st) < N
    write_with_outage(url, opts(s3, FAST), None, N)  # the resume (no outage)
    assert_once_and_equal(url, s3, reference)
    # a read past the budget: one line naming the sample, not a SampleReadError (--skip-bad-samples keeps it)
    st = Store.open(url, storage_options=opts(s3, SHORT))
    s3.outage(2.0)
    with pytest.raises(StoreUnavailableError) as e:
        st.read(0)
    assert not isinstance(e.value, SampleReadError)
    assert f"reading sample {st.keys()[0]!r} (kv)" in str(e.value) and "\n" not in str(e.value)
    s3.wait_up()
    assert_stores_equal(st.select([0]), reference.select([0]))


def test_only_transient_errors_are_retried(s3, caplog):
    url = "s3://kvcache/not-transient"
    produce(url, 2, 0, 1, storage_options=s3.options)
    st = Store.open(url, storage_options=opts(s3, FAST))
    st._loc.fs.rm(st._loc.path("samples", st.manifest(0)["sid"], "kv", "c.0.0.0.0.0"))
    caplog.set_level(logging.WARNING, "alpamayo.store")
    t0 = time.monotonic()
    with pytest.raises(SampleReadError, match="file missing"):  # a missing key on a live server: at once
        st.read(0)
    with pytest.raises(FileNotFoundError):
        Store.open("s3://kvcache/nope", storage_options=opts(s3, FAST))
    assert time.monotonic() - t0 < 2 and not retries(caplog)
    from botocore.exceptions import ClientError, EndpointConnectionError

    def client_error(status, code):
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    wrapped = OSError(16, "SlowDown")
    wrapped.__cause__ = client_error(503, "SlowDown")
    assert transient(EndpointConnectionError(endpoint_url="http://x")) and transient(wrapped)
    assert transient(ConnectionRefusedError()) and transient(client_error(500, "InternalError"))
    assert not transient(client_error(404, "NoSuchKey")) and not transient(client_error(403, "AccessDenied"))
    assert not transient(FileNotFoundError()) and not transient(SampleReadError("u", "k", "kv", "checksum mismatch"))


def test_retry_settings(monkeypatch):
    assert RetryPolicy.resolve() == RetryPolicy()
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", "attempts=3, budget_s=2.5")
    assert RetryPolicy.resolve({"first_delay_s": 1}) == RetryPolicy(attempts=3, budget_s=2.5, first_delay_s=1.0)
    assert [RetryPolicy().delay(n) for n in range(1, 7)] == [0.5, 1, 2, 4, 8, 10]
    with pytest.raises(ValueError, match="unknown retry setting"):
        RetryPolicy.resolve({"tries": 3})
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", "attempts=x")
    with pytest.raises(ValueError, match="ALPAMAYO_STORE_RETRY"):
        RetryPolicy.resolve()


def test_an_endpoint_that_accepts_and_never_answers_is_retried_then_one_line(s3, reference, caplog):
    """A stuck endpoint (connections accepted, requests never answered): the read timeout turns each try
    into a transient error, retried; past the budget one line naming the sample, in bounded time (small
    timeouts here; the defaults are 5 s connect, 30 s read); a hang inside the budget changes nothing."""
    url = "s3://kvcache/hang"
    produce(url, 2, 0, 1, storage_options=s3.options)

    def quick(retry):  # botocore: one try, 0.5 s timeouts (a fresh dict: botocore edits its retries entry)
        return {**s3.options, "retry": retry, "config_kwargs": {
            "retries": {"total_max_attempts": 1, "mode": "standard"}, "connect_timeout": 0.5, "read_timeout": 0.5}}

    one_retry = {"attempts": 3, "first_delay_s": 0.1, "max_delay_s": 0.2, "budget_s": 1.0}
    st = Store.open(url, storage_options=quick(one_retry))
    key = st.keys()[0]
    caplog.set_level(logging.WARNING, "alpamayo.store")
    s3.hang(4.0)
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError) as e:
        st.read(key)
    took = time.monotonic() - t0
    msg = str(e.value)
    # 1-3 tries of 0.5 s inside the 1 s budget (how many depends on this box's load; s3fs's own 5 hidden
    # tries per call would make it 2.5 s or more per try)
    assert 0.5 <= took < 4.0 and re.search(r"failed [123] time\(s\)", msg), (took, msg)
    assert "\n" not in msg and f"reading sample {key!r} (kv)" in msg and "the store did not answer" in msg
    assert "ReadTimeoutError" in msg and not isinstance(e.value, SampleReadError)
    assert [x for x in retries(caplog) if "ReadTimeoutError" in x and f"GET {url}/samples/" in x]
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="the store did not answer"):  # opening, too
        Store.open(url, storage_options=quick(one_retry))
    assert time.monotonic() - t0 < 4.0
    s3.wait_up()
    st = Store.open(url, storage_options=quick(FAST))
    s3.hang(1.0)  # inside the budget: the read outlasts it
    got = st.read(key)
    s3.wait_up()
    want = reference.read(key)
    assert torch.equal(got.k.view(torch.int16), want.k.view(torch.int16))
    assert torch.equal(got.v.view(torch.int16), want.v.view(torch.int16))


def test_errors_s3fs_used_to_retry_are_classified():
    """s3fs retried some errors itself (its `retries`, now 1: `no_hidden_retries`); each is classified here,
    built as s3fs hands it over (a ClientError goes through s3fs's translate_boto_error). Damaged in transit
    (a reply cut or garbled, a payload whose checksum the server or botocore rejects): transient, the same
    request again goes through. The request itself wrong, a key that is not there, a clock 15 min off, a
    checksum setting botocore does not know: not transient, refused at once."""
    from botocore.exceptions import ClientError, FlexibleChecksumError
    from botocore.parsers import ResponseParserError
    from s3fs.errors import translate_boto_error

    def client_error(status, code, msg=""):
        return ClientError({"Error": {"Code": code, "Message": msg}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "PutObject")

    transient_ones = {
        "reply not parseable": ResponseParserError("Unable to parse response (no element found: line 1, column 0)"),
        "sha256 of the body": client_error(400, "XAmzContentSHA256Mismatch",
                                           "The provided 'x-amz-content-sha256' header does not match what was "
                                           "computed."),
        "md5 / checksum of the body": client_error(400, "BadDigest", "The CRC32 you specified did not match the "
                                                   "calculated checksum."),
        "server timed the request out": client_error(400, "RequestTimeout", "Your socket connection to the server "
                                                     "was not read from or written to within the timeout period."),
        "throttled with 429": client_error(429, "TooManyRequests"),
        "reply checksum (botocore)": FlexibleChecksumError(
            error_msg="Expected checksum AAAA did not match calculated checksum: BBBB"),
    }
    permanent = {
        "missing key": client_error(404, "NoSuchKey"),
        "missing bucket": client_error(404, "NoSuchBucket"),
        "clock skew": client_error(403, "RequestTimeTooSkewed", "The difference between the request time and the "
                                   "current time is too large."),
        "bad request": client_error(400, "InvalidArgument"),
        "malformed digest header": client_error(400, "InvalidDigest"),
        "checksum setting": FlexibleChecksumError(error_msg="Unsupported checksum algorithm: foo"),
    }
    for name, e in transient_ones.items():
        assert transient(e), name
        if isinstance(e, ClientError):
            assert transient(translate_boto_error(e)), f"{name}, as s3fs raises it"
    for name, e in permanent.items():
        assert not transient(e), name
        if isinstance(e, ClientError):
            assert not transient(translate_boto_error(e)), f"{name}, as s3fs raises it"

    # through the retry layer: retried (and logged), then the second try's answer
    tries = []

    def put_once_mangled():
        tries.append(1)
        if len(tries) == 1:
            raise translate_boto_error(transient_ones["sha256 of the body"])
        return "ok"

    policy = RetryPolicy(attempts=3, first_delay_s=0, budget_s=5)
    assert retry_call(policy, "PUT s3://b/k", put_once_mangled) == "ok" and len(tries) == 2
    tries.clear()

    def missing():
        tries.append(1)
        raise translate_boto_error(permanent["missing key"])

    with pytest.raises(FileNotFoundError):
        retry_call(policy, "GET s3://b/k", missing)
    assert len(tries) == 1
