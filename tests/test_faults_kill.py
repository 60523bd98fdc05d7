"""SIGKILL at a moment that matters: each writer is held at a failpoint (mid-chunk, just before its
commit, mid-manifest, mid-index), the torn state is asserted to exist, then the process is killed.
A resume must verify clean, hold every sample exactly once, and equal an uninterrupted build; a
resume that counted a torn sample as done would leave it without a manifest and fail here.

This file doubles as the producer run in subprocesses:  python tests/test_faults_kill.py URL N PROCS
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from shared.store import KVSpec, Store, StoreWriter, sample_id, synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
SPEC = KVSpec(num_layers=4, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10), chunk_mb=0.002)
PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="teacher",
            dataset_revision="r1", code_version="test")
N = 10


def produce(url: str, n: int, processes: int) -> None:
    w = StoreWriter.create(url, PROV, SPEC, mode="resume", processes=processes, workers=2, max_pending=2)
    done = w.done_keys()
    for i in range(n):
        s = synthetic_sample(i, SPEC, prefix_len=12 + 5 * i)
        if s.key not in done:
            w.write(s)
            print("queued", s.key, flush=True)
    w.close()


def run(url: str, processes: int, failpoints: str = "", marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALPAMAYO_FAILPOINTS": failpoints,
           "ALPAMAYO_FAILPOINTS_MARKER": str(marker or "")}
    return subprocess.Popen([sys.executable, __file__, url, str(N), str(processes)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def wait_marker(marker: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        if marker.exists() and marker.read_text().strip():
            return json.loads(marker.read_text().splitlines()[0])
        if proc.poll() is not None:
            raise AssertionError(f"producer exited {proc.returncode} before the failpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("failpoint never reached")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the producer and (its session) any writer process: nothing may commit afterwards."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def assert_equal_stores(a: Store, b: Store) -> None:
    assert a.keys() == b.keys()
    for key in a.keys():
        ma, mb = a.manifest(key), b.manifest(key)
        assert ma["arrays"] == mb["arrays"] and ma["files"] == mb["files"], key
        x, y = a.read(key), b.read(key)
        assert torch.equal(x.k.view(torch.int16), y.k.view(torch.int16)) and torch.equal(
            x.hidden.view(torch.int16), y.hidden.view(torch.int16))


@pytest.fixture
def tmp_path():
    with tempfile.TemporaryDirectory(prefix="faults-kill-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def reference():
    with tempfile.TemporaryDirectory(prefix="faults-kill-ref-") as d:
        produce(d + "/c", N, 0)
        yield Store.open(d + "/c")


# the fast subset (bench/fault_injection.py runs each point at random hits, with cache-build too)
CASES = [("chunk_write=hold@9", 0), ("before_commit=hold@4", 0), ("before_commit=hold@4", 2),
         ("manifest_write=hold@3", 0), ("index_write=hold", 0)]


@pytest.mark.parametrize("point,processes", CASES)
def test_killed_at_a_failpoint_resumes_to_the_uninterrupted_store(tmp_path, reference, point, processes):
    url, marker = tmp_path / "c", tmp_path / "marker"
    p = run(str(url), processes, point, marker)
    hit = wait_marker(marker, p)
    name = point.split("=")[0]
    commits = url / "commits" / "0"
    # the torn state exists before the kill
    if name == "chunk_write":
        torn = url / "samples" / hit["sid"] / hit["file"]
        assert torn.exists() and not (commits / f"{hit['sid']}.json").exists()
    elif name == "before_commit":
        sdir = url / "samples" / hit["sid"]
        assert any(sdir.glob("kv/c.*")) and (sdir / "traj" / "c.0").exists()
        assert not (commits / f"{hit['sid']}.json").exists()
    elif name == "manifest_write":
        sid = sample_id(hit["key"])
        assert (commits / f"{sid}.json.tmp-failpoint").exists() and not (commits / f"{sid}.json").exists()
    else:
        assert (url / "index" / "0.json.tmp-failpoint").exists() and not (url / "index" / "0.json").exists()
    kill_group(p)
    partial = Store.open(str(url))
    assert partial.verify().ok
    if name == "index_write":
        assert len(partial) == N
    else:
        assert len(partial) < N and partial.verify().warnings  # the torn sample is an orphan, not a sample
    committed = len(partial)
    time.sleep(0.5)  # a writer process that outlived the kill would commit now
    assert len(Store.open(str(url))) == committed
    p2 = run(str(url), processes)
    out, err = p2.communicate(timeout=120)
    assert p2.returncode == 0, err[-2000:]
    assert out.count("queued") == N - committed  # nothing rewritten, nothing skipped
    st = Store.open(str(url))
    rep = st.verify()
    assert rep.ok and not rep.warnings, str(rep)
    assert len(st) == N and not st._duplicates
    assert_equal_stores(st, reference)


if __name__ == "__main__":
    produce(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
