"""A full disk during a build: a clear error, committed samples intact, resume after freeing space gives
the uninterrupted store. On a real tmpfs when this process may mount one (root), else skipped; the
ENOSPC failpoint (an os-level error raised where a chunk is written) runs everywhere. Also: a second
writer of the same shard refuses while the first lives."""

import errno
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

import shared.failpoints as fp
from shared.store import KVSpec, Store, StoreError, StoreWriter, synthetic_sample

SPEC = KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, hidden_size=32, thumb_hw=(6, 10), chunk_mb=0.004,
              codec="none")
PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="teacher",
            dataset_revision="r1", code_version="test")
N = 8


def _samples():
    return [synthetic_sample(i, SPEC, prefix_len=30 + 4 * i) for i in range(N)]


def _fill(url: str) -> int:
    """Resume-build all N samples; -> how many this call wrote."""
    with StoreWriter.create(url, PROV, SPEC, mode="resume") as w:
        done = w.done_keys()
        for s in _samples():
            if s.key not in done:
                w.write(s)
    return w.samples_written


def _assert_complete(url: str, ref: Store) -> None:
    st = Store.open(url)
    rep = st.verify()
    assert rep.ok and not rep.warnings, str(rep)
    assert st.keys() == ref.keys()
    for k in ref.keys():
        assert st.manifest(k)["arrays"] == ref.manifest(k)["arrays"]
        assert torch.equal(st.read(k).k, ref.read(k).k)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ref") / "c")
    _fill(url)
    return Store.open(url)


def test_enospc_mid_chunk_is_a_clear_error_and_resume_completes(tmp_path, ref, monkeypatch):
    url = str(tmp_path / "c")
    monkeypatch.setitem(fp._ACTIVE, "chunk_write", ("enospc", 23))
    monkeypatch.setattr(fp, "_hits", {})
    with pytest.raises(StoreError, match=r"No space left on device.*committed so far are intact.*--resume") as e:
        _fill(url)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    partial = Store.open(url)
    assert 0 < len(partial) < N and partial.verify().ok
    monkeypatch.delitem(fp._ACTIVE, "chunk_write")
    assert _fill(url) == N - len(partial)
    _assert_complete(url, ref)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_a_real_full_tmpfs_then_more_space(tmp_path, ref):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    if not _mount_tmpfs(mnt, "160k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the ENOSPC failpoint test covers the code path")
    try:
        url = str(mnt / "c")
        with pytest.raises(StoreError, match=r"No space left on device"):
            _fill(url)
        partial = Store.open(url)
        assert len(partial) < N and partial.verify().ok  # what is visible is whole
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)  # "free space"
        assert _fill(url) == N - len(partial)
        _assert_complete(url, ref)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_second_writer_of_the_same_shard_refuses_while_the_first_lives(tmp_path, ref):
    url = str(tmp_path / "c")
    w1 = StoreWriter.create(url, PROV, SPEC, writer_id="0of2")
    with pytest.raises(StoreError, match=r"another writer with id '0of2' is writing into .*\(pid \d+ on "):
        StoreWriter.create(url, PROV, SPEC, mode="resume", writer_id="0of2")
    w2 = StoreWriter.create(url, PROV, SPEC, mode="resume", writer_id="1of2")  # another shard: fine
    for i, s in enumerate(_samples()):
        (w1 if i % 2 == 0 else w2).write(s)
    w1.close()
    w2.close()
    StoreWriter.create(url, PROV, SPEC, mode="resume", writer_id="0of2").close()  # released at close
    _assert_complete(url, ref)
