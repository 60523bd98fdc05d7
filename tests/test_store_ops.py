"""Operations on real processes and a real S3 endpoint: two shard writers into one store lose nothing;
the same store over s3:// (moto server on loopback). SIGKILL + resume: tests/test_faults_kill.py.

This file doubles as the fake producer run in subprocesses:
    python tests/test_store_ops.py URL N SHARD_I SHARD_N [DELAY_S]
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.store import KVSpec, Store, StoreError, StoreWriter, synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10), kv_dtype="bfloat16")
PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="sft-no-cot",
            dataset_revision="r1", code_version="test")
N = 24


def produce(url: str, n: int, shard_i: int, shard_n: int, delay: float = 0.0, storage_options=None) -> None:
    """What cache-build does, with random tensors: resume, skip done keys, write my shard."""
    w = StoreWriter.create(url, PROV, SPEC, mode="resume", writer_id=str(shard_i), storage_options=storage_options)
    done = w.done_keys()
    for i in range(n):
        if i % shard_n != shard_i:
            continue
        s = synthetic_sample(i, SPEC)
        if s.key in done:
            continue
        w.write(s)
        print(f"queued {i} committed {w.samples_written}", flush=True)
        time.sleep(delay)
    w.close()
    print("done", flush=True)


def run(url, *args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, __file__, url, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def assert_stores_equal(a: Store, b: Store) -> None:
    assert a.keys() == b.keys()
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        assert torch.equal(x.k.view(torch.int16), y.k.view(torch.int16))
        assert torch.equal(x.v.view(torch.int16), y.v.view(torch.int16))
        assert torch.equal(x.hidden.view(torch.int16), y.hidden.view(torch.int16))
        assert np.array_equal(x.gt_action, y.gt_action) and np.array_equal(x.thumbs, y.thumbs)
        ma, mb = a.manifest(key), b.manifest(key)
        assert {n: m["crc32"] for n, m in ma["arrays"].items()} == {n: m["crc32"] for n, m in mb["arrays"].items()}
        assert (ma["prefix_len"], ma["reasoning"], ma["curvature"]) == (mb["prefix_len"], mb["reasoning"], mb["curvature"])


@pytest.fixture
def tmp_path():
    """Own temp dirs: pytest's shared basetemp can be pruned by other pytest sessions on this machine."""
    with tempfile.TemporaryDirectory(prefix="store-ops-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def reference() -> Store:
    d = tempfile.TemporaryDirectory(prefix="store-ops-ref-")
    url = str(Path(d.name) / "c")
    produce(url, N, 0, 1)
    st = Store.open(url)
    assert len(st) == N
    yield st
    d.cleanup()


def test_two_shard_writers_one_store(tmp_path, reference):
    url = str(tmp_path / "c")
    procs = [run(url, N, i, 2, 0.01) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    st = Store.open(url)
    rep = st.verify()
    assert rep.ok and not rep.warnings, str(rep)
    assert len(st) == N and st.summary()["writers"] == {"0": N // 2, "1": N // 2}
    assert_stores_equal(st, reference)


# ----------------------------------------------------------------------------- S3 (moto, loopback only)
@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch_module.delenv(k, raising=False)
    monkeypatch_module.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch_module.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch_module.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test",
          "config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}}}
    import s3fs

    s3fs.S3FileSystem(**so).mkdir("kvcache")
    yield so
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_s3_store_roundtrip_resume_and_refusal(s3, reference):
    url = "s3://kvcache/run1"
    produce(url, 6, 0, 1, storage_options=s3)
    st = Store.open(url, storage_options=s3)
    assert len(st) == 6 and st.url == url
    ref = reference.select(st.keys())
    assert_stores_equal(st, ref)
    rep = st.verify()
    assert rep.ok and not rep.warnings, str(rep)
    assert st.table().num_rows == 6 and st.summary()["bytes_stored"] > 0
    produce(url, 10, 0, 1, storage_options=s3)  # resume: appends 4, rewrites none
    st = Store.open(url, storage_options=s3)
    assert len(st) == 10 and st.verify().ok
    assert_stores_equal(st, reference.select(st.keys()))
    with pytest.raises(StoreError, match="differing keys: prefix_mode"):
        StoreWriter.create(url, {**PROV, "prefix_mode": "given-cot"}, SPEC, mode="resume", storage_options=s3)
    with pytest.raises(FileNotFoundError, match="no cache at s3://kvcache/nope"):
        Store.open("s3://kvcache/nope", storage_options=s3)


if __name__ == "__main__":
    url_, n_, i_, k_ = sys.argv[1:5]
    produce(url_, int(n_), int(i_), int(k_), float(sys.argv[5]) if len(sys.argv) > 5 else 0.0)
