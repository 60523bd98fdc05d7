"""The `cache-build` command itself (tiny checkpoint, VLM prefill, synthetic world) writing into s3:// while
the endpoint (moto on loopback, tests/s3_endpoint.py) stops and restarts mid-build. Inside the retry
budget the build finishes by itself; past it, one `cache-build: error:` line (exit 2, no traceback) and
`--resume` completes. Either way every sample is committed once, `cache-inspect verify` is clean and the
store equals a local build of the same inputs. cache-build takes no storage options: the endpoint and
the retry settings reach it through the environment (AWS_ENDPOINT_URL, ALPAMAYO_STORE_RETRY)."""

import json
import logging

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3_endpoint import S3Endpoint  # noqa: E402
from test_store_ops import assert_stores_equal  # noqa: E402

from cache_builder import cache_build, cache_inspect  # noqa: E402
from shared.data import write_synthetic_world  # noqa: E402
from shared.store import Store, StoreWriter  # noqa: E402

FAST = "attempts=30,first_delay_s=0.1,max_delay_s=0.4,budget_s=15"  # outlasts the 1.5 s outage
SHORT = "attempts=3,first_delay_s=0.1,max_delay_s=0.2,budget_s=0.5"  # gives up inside the 3 s one


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_build_world")
    write_synthetic_world(root, n_clips=3, seed=5, width=160, height=96, duration_s=8.0,
                          kinds=["sharp-left", "straight", "sharp-right"])
    return root


def cli(world, ckpt, out, *extra) -> list[str]:
    return ["--dataset", str(world), "--checkpoint", str(ckpt), "--out", str(out), "--cameras", "front-only",
            "--keyframes", "stride:1", "--batch-size", "1", *extra]


@pytest.fixture(scope="module")
def reference(world, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote_build_ref") / "store"
    assert cache_build.main(cli(world, tiny_checkpoint, out)) == 0
    st = Store.open(str(out))
    assert len(st) >= 6
    return st


@pytest.fixture(scope="module")
def s3():
    mp = pytest.MonkeyPatch()
    with S3Endpoint() as ep:
        for k, v in ep.env().items():
            mp.setenv(k, v)
        mp.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore tries once: the outage reaches the store's retry layer
        yield ep
    mp.undo()


@pytest.fixture(autouse=True)
def endpoint_back(s3):
    """A test that fails mid-outage leaves the endpoint up for the next one."""
    yield
    s3.wait_up()


def outage_at(monkeypatch, s3, n: int, seconds: float) -> list[int]:
    """The endpoint goes away when the build hands its n-th sample to the store writer (1-based)."""
    calls = []
    real = StoreWriter.write

    def write(self, s):
        calls.append(1)
        if len(calls) == n:
            s3.outage(seconds)
        return real(self, s)

    monkeypatch.setattr(StoreWriter, "write", write)
    return calls


def assert_verified_once_and_equal(url, reference, capsys):
    capsys.readouterr()
    assert cache_inspect.main(["verify", url]) == 0, capsys.readouterr()
    st = Store.open(url)
    assert not st._duplicates and len(st) == len(reference)  # every sample exactly once
    assert_stores_equal(st, reference)


def test_cache_build_through_an_outage_completes(s3, world, tiny_checkpoint, reference, monkeypatch, capsys, caplog):
    url = "s3://kvcache/cli-through"
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", FAST)
    caplog.set_level(logging.WARNING, "alpamayo.store")
    calls = outage_at(monkeypatch, s3, 3, 1.5)
    assert cache_build.main(cli(world, tiny_checkpoint, url)) == 0, capsys.readouterr().err[-3000:]
    s3.wait_up()
    assert len(calls) == len(reference)
    summary = json.loads(capsys.readouterr().out)
    assert summary["written"] == len(reference) and summary["already_done"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "alpamayo.store"]
    assert any(x.startswith("store: retry 1/29 in 0.1 s: ") and url in x for x in lines), lines[:3]  # it did hit
    assert_verified_once_and_equal(url, reference, capsys)


@pytest.mark.parametrize("procs", [0, 1])
def test_cache_build_past_the_budget_is_one_line_then_resume_completes(s3, world, tiny_checkpoint, reference,
                                                                      monkeypatch, capfd, procs):
    """Writer threads, or one writer process (its retry lines go to stderr itself). The error line is the
    last thing the build prints: it starts a line (the progress bar is closed first) and no writer is
    still at work after it."""
    url = f"s3://kvcache/cli-past-budget-{procs}"
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", SHORT)
    outage_at(monkeypatch, s3, 3, 3.0)
    assert cache_build.main(cli(world, tiny_checkpoint, url, "--writer-processes", str(procs))) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    errors = [x for x in err.splitlines() if "cache-build: error" in x]
    assert len(errors) == 1 and errors[0].startswith(f"cache-build: error: writing into {url} failed: "), err[-3000:]
    assert "the store did not answer" in errors[0] and "rerun with --resume" in errors[0]
    assert err.rstrip().splitlines()[-1] == errors[0], err[-3000:]
    s3.wait_up()
    partial = Store.open(url)
    assert partial.verify().ok and len(partial) < len(reference)  # what was committed is whole (a writer process
    # may not have committed any sample yet when the outage began)
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", FAST)
    assert cache_build.main(cli(world, tiny_checkpoint, url, "--resume")) == 0, capfd.readouterr().err[-3000:]
    summary = json.loads(capfd.readouterr().out)
    assert summary["already_done"] == len(partial) and summary["written"] == len(reference) - len(partial)
    assert_verified_once_and_equal(url, reference, capfd)
