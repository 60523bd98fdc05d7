"""Store writer processes: the same bytes as the threaded writer, errors surfaced, nothing left by a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.store import KVSpec, Store, StoreError, StoreWriter, synthetic_sample

PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="teacher",
            dataset_revision="r1", code_version="test")
TINY = dict(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "samples").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kv_dtype,quant", [("bfloat16", "none"), ("bfloat16", "int4"), ("float32", "int8")])
def test_processes_write_the_bytes_threads_write(tmp_path, kv_dtype, quant):
    """Prefix lengths that grow make the slabs grow; every file and manifest equals the threaded writer's."""
    spec = KVSpec(**TINY, kv_dtype=kv_dtype, quant=quant)
    ss = [synthetic_sample(i, spec, prefix_len=8 + 40 * i) for i in range(5)]
    for name, kw in (("threads", dict(workers=2)), ("procs", dict(processes=2))):
        with StoreWriter.create(str(tmp_path / name), PROV, spec, **kw) as w:
            for s in ss:
                w.write(s)
        assert w.samples_written == 5
    assert _files(tmp_path / "threads") == _files(tmp_path / "procs")
    a, b = Store.open(str(tmp_path / "threads")), Store.open(str(tmp_path / "procs"))
    for k in a.keys():
        ma, mb = a.manifest(k), b.manifest(k)
        ma.pop("written"), mb.pop("written")
        assert ma == mb
    assert b.verify().ok


def test_a_failure_in_a_writer_process_names_the_sample(tmp_path):
    spec = KVSpec(**TINY)
    w = StoreWriter.create(str(tmp_path / "c"), PROV, spec, processes=1)
    proc = w._procs[0]
    with pytest.raises(StoreError, match=r"writing 'k0' in store-writer-0-0 failed: KeyError"):
        proc.commit({"key": "k0"}, {})  # no prefix_len: the process reports, and keeps serving
    w.write(synthetic_sample(0, spec))
    w.close()
    assert len(Store.open(str(tmp_path / "c"))) == 1 and proc.proc.poll() == 0


def test_writer_processes_die_with_a_killed_builder(tmp_path):
    """SIGKILL the process that owns the writer: its writer processes go too (nothing commits later),
    and no shared memory is left behind (the slabs are memfds, never named in /dev/shm)."""
    url = tmp_path / "c"
    script = textwrap.dedent(f"""
        import itertools, json, sys
        from shared.store import KVSpec, StoreWriter, synthetic_sample
        spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10))
        w = StoreWriter.create({str(url)!r}, {PROV!r}, spec, processes=2)
        print(json.dumps([p.proc.pid for p in w._procs]), flush=True)
        for i in itertools.count():
            w.write(synthetic_sample(i, spec, prefix_len=64))
    """)
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    pids = json.loads(p.stdout.readline())
    deadline = time.time() + 60
    while time.time() < deadline and len(_committed(url)) < 3:
        time.sleep(0.1)
    assert len(_committed(url)) >= 3
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)
    n = len(_committed(url))
    time.sleep(0.5)
    assert len(_committed(url)) == n
    assert Store.open(str(url)).verify().ok
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= shm_before


def _committed(url: Path) -> list[Path]:
    return list((url / "commits").rglob("*.json")) if (url / "commits").exists() else []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_negative_process_count_is_refused(tmp_path):
    with pytest.raises(ValueError, match="processes >= 0"):
        StoreWriter.create(str(tmp_path / "c"), PROV, KVSpec(**TINY), processes=-1)
    assert not (tmp_path / "c").exists()  # refused before anything is written
