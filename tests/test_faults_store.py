"""Damaged stores: every kind of damage is refused on read with the sample's key, `verify` names every
damaged sample (`--quick` what it can see without reading contents), nothing reads as fill values."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.store import (
    KVSpec,
    SampleReadError,
    Store,
    StoreError,
    StoreMismatchError,
    StoreWriter,
    drop_samples,
    expected_files,
    sample_id,
    synthetic_sample,
)
from shared.store.format import sample_file_names

PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="teacher",
            dataset_revision="r1", code_version="test")
TINY = dict(num_layers=4, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10), chunk_mb=0.002)


def _build(url: Path, n: int = 6, **spec_kw) -> Store:
    spec = KVSpec(**{**TINY, **spec_kw})
    with StoreWriter.create(str(url), PROV, spec) as w:
        for i in range(n):
            w.write(synthetic_sample(i, spec, prefix_len=20 + 3 * i))
    return Store.open(str(url))


def _file(st: Store, key: str, name: str) -> Path:
    return Path(st.url) / "samples" / sample_id(key) / name


def _flip(p: Path, at: int | None = None) -> None:
    b = bytearray(p.read_bytes())
    i = len(b) // 2 if at is None else at
    b[i] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("spec_kw", [{}, {"shard": True}, {"quant": "int4"}, {"codec": "none", "store_hidden": False}])
def test_recorded_files_are_the_derived_names_and_sizes_on_disk(tmp_path, spec_kw):
    st = _build(tmp_path / "c", **spec_kw)
    for key in st.keys():
        m = st.manifest(key)
        files = expected_files(st.spec, m)
        assert sorted(files) == sample_file_names(st.spec, m["arrays"])
        sdir = Path(st.url) / "samples" / m["sid"]
        on_disk = {str(p.relative_to(sdir)): p.stat().st_size for p in sdir.rglob("*") if p.is_file()}
        assert on_disk == files
    assert sum(len(expected_files(st.spec, st.manifest(k))) for k in st.keys()) > 6 * 8  # multi-chunk arrays


@pytest.mark.parametrize("spec_kw", [{}, {"shard": True}])
def test_a_deleted_chunk_is_refused_not_read_as_zeros(tmp_path, spec_kw):
    st = _build(tmp_path / "c", **spec_kw)
    key = st.keys()[2]
    chunk = sorted(f for f in expected_files(st.spec, st.manifest(key)) if f.startswith("kv/c."))[-1]
    _file(st, key, chunk).unlink()
    with pytest.raises(SampleReadError, match="file missing") as e:
        st.read(key)
    assert (e.value.key, e.value.array, e.value.file) == (key, "kv", chunk)
    assert repr(key) in str(e.value) and "cache-inspect verify" in str(e.value)
    back = pickle.loads(pickle.dumps(e.value))  # crosses DataLoader worker processes whole
    assert (back.key, back.file, str(back)) == (key, chunk, str(e.value))
    assert str(SampleReadError(str(e.value))) == str(e.value)  # torch's re-raise from the message alone
    with pytest.raises(SampleReadError, match="file missing"):  # unchecked crc or a layer subset: still refused
        Store.open(st.url, checksums=False).read(key, layers=[st.spec.num_layers - 1])
    for data in (False, True):
        rep = st.verify(data=data)
        assert rep.damaged == {key} and any(f"file {chunk} missing" in x for x in rep.errors), str(rep)
    for other in st.keys():
        if other != key:
            st.read(other)


def test_a_truncated_chunk_names_the_sample_not_a_codec_traceback(tmp_path):
    st = _build(tmp_path / "c")
    key = st.keys()[1]
    p = _file(st, key, "hidden/c.0.0")
    p.write_bytes(p.read_bytes()[:-7])
    with pytest.raises(SampleReadError, match=r"hidden \(hidden/c\.0\.0\): file has \d+ bytes, the manifest recorded"):
        st.read(key)
    rep = st.verify(data=False)
    assert rep.damaged == {key} and "does NOT" not in str(rep) and "--quick did not check" in str(rep)


@pytest.mark.parametrize("codec", ["zstd", "none"])
def test_flipped_bytes_fail_the_checksum_and_only_full_verify_sees_them(tmp_path, codec):
    st = _build(tmp_path / "c", codec=codec)
    key = st.keys()[3]
    _flip(_file(st, key, "kv/c.1.0.0.0.0"), at=-9 if codec == "zstd" else None)
    with pytest.raises(SampleReadError) as e:
        st.read(key)
    assert e.value.key == key and e.value.array == "kv"
    assert ("checksum mismatch" in e.value.reason) or ("unreadable" in e.value.reason)
    assert st.verify(data=False).ok  # same size: --quick cannot see it, and says so
    assert "file contents" in str(st.verify(data=False))
    assert st.verify().damaged == {key}
    if codec == "none":  # the documented opt-out: no crc32, the flipped value is returned
        x, ref = Store.open(st.url, checksums=False).read(key), synthetic_sample(3, st.spec, prefix_len=29)
        assert not (torch.equal(x.k, ref.k) and torch.equal(x.v, ref.v))


def test_a_layer_subset_read_is_checked_too(tmp_path):
    """The crc32 covers the whole array: a checked subset read reads it all, so damage in any layer is
    refused, also for a subset without that layer; checksums=False (the opt-out) reads only its layers."""
    st = _build(tmp_path / "c", codec="none")
    key = st.keys()[2]
    whole = st.read(key, with_hidden=False)
    sub = st.read(key, layers=[3, 1], with_hidden=False)
    assert torch.equal(sub.k, whole.k[[3, 1]]) and torch.equal(sub.v, whole.v[[3, 1]]) and sub.layers == (3, 1)
    _flip(_file(st, key, "kv/c.1.0.0.0.0"))  # layer 1's chunk, same size
    for layers in ([1], [0, 2]):
        with pytest.raises(SampleReadError, match="checksum mismatch") as e:
            st.read(key, layers=layers)
        assert e.value.key == key and e.value.array == "kv"
    loose = Store.open(st.url, checksums=False)
    assert torch.equal(loose.read(key, layers=[0, 2]).k, whole.k[[0, 2]])
    assert not torch.equal(loose.read(key, layers=[1]).v, whole.v[[1]])  # what the opt-out accepts


def test_verify_names_every_damaged_sample_and_drop_then_resume_rebuilds_them(tmp_path):
    st = _build(tmp_path / "c", n=8)
    keys = st.keys()
    _file(st, keys[0], "traj/c.0").unlink()                                   # deleted
    p = _file(st, keys[2], "kv/c.0.0.0.0.0")
    p.write_bytes(p.read_bytes()[:5])                                         # truncated
    _flip(_file(st, keys[4], "thumbs/c.0.0.0.0"), at=-9)                      # flipped
    mpath = Path(st.url) / "commits" / "0" / f"{sample_id(keys[5])}.json"
    m = json.loads(mpath.read_text())
    m["arrays"]["token_ids"]["crc32"] ^= 1                                    # manifest edited: checksum
    mpath.write_text(json.dumps(m))
    mpath6 = Path(st.url) / "commits" / "0" / f"{sample_id(keys[6])}.json"
    mpath6.write_text(mpath6.read_text()[:40])                                # manifest truncated
    os.remove(Path(st.url) / "index" / "0.json")                              # the snapshot no longer hides edits
    with pytest.raises(StoreError, match=r"1 damaged manifest.*" + sample_id(keys[6])):
        Store.open(st.url)
    st = Store.open(st.url, skip_damaged=True)
    rep = st.verify()
    assert rep.damaged == {keys[0], keys[2], keys[4], keys[5], keys[6]}, str(rep)
    assert Store.open(st.url, skip_damaged=True).verify(data=False).damaged == {keys[0], keys[2], keys[6]}
    assert set(drop_samples(st.url, sorted(rep.damaged))) == rep.damaged
    spec = st.spec
    with StoreWriter.create(st.url, PROV, spec, mode="resume") as w:
        done = w.done_keys()
        for i in range(8):
            s = synthetic_sample(i, spec, prefix_len=20 + 3 * i)
            if s.key not in done:
                w.write(s)
    assert w.samples_written == 5
    healed = Store.open(st.url)
    assert healed.keys() == keys and healed.verify().ok and not healed.verify().warnings
    fresh = _build(tmp_path / "fresh", n=8)
    for k in keys:
        a, b = healed.manifest(k), fresh.manifest(k)
        assert a["arrays"] == b["arrays"] and a["files"] == b["files"]


def test_an_edited_index_snapshot_is_not_trusted_over_the_checksums(tmp_path):
    st = _build(tmp_path / "c")
    idx = Path(st.url) / "index" / "0.json"
    snap = json.loads(idx.read_text())
    snap["manifests"][0]["prefix_len"] = "twenty"  # unusable entry: the commit file is read instead
    snap["manifests"][1]["arrays"]["kv"]["crc32"] ^= 1  # plausible entry: the read refuses it
    idx.write_text(json.dumps(snap))
    st = Store.open(st.url)
    st.read(snap["manifests"][0]["key"])
    with pytest.raises(SampleReadError, match="checksum mismatch"):
        st.read(snap["manifests"][1]["key"])


def test_older_manifests_without_recorded_sizes_still_catch_a_deleted_chunk(tmp_path):
    st = _build(tmp_path / "c")
    os.remove(Path(st.url) / "index" / "0.json")
    for p in (Path(st.url) / "commits" / "0").iterdir():  # what stores written before issue 13 hold
        m = json.loads(p.read_text())
        del m["files"]
        p.write_text(json.dumps(m))
    st = Store.open(st.url)
    key = st.keys()[0]
    st.read(key)
    _file(st, key, "kv/c.0.0.0.0.0").unlink()
    with pytest.raises(SampleReadError, match=r"checksum mismatch .*missing files read as fill values: \['kv/c\.0"):
        st.read(key)
    assert st.verify(data=False).damaged == {key}  # derived names


def test_require_names_what_differs(tmp_path):
    st = _build(tmp_path / "c", n=1)
    st.require({"prefix_mode": "teacher", "spec.num_layers": 4, "schema_version": 1})
    with pytest.raises(StoreMismatchError, match=r"prefix_mode: store 'teacher' vs the head 'rollout'; "
                                                 r"processor: store 'proc@1' vs the head 'proc@2'") as e:
        st.require({"processor": "proc@2", "prefix_mode": "rollout", "checkpoint": "tiny@abc"}, what="the head")
    assert set(e.value.differences) == {"processor", "prefix_mode"}
    with pytest.raises(StoreMismatchError, match=r"spec.head_dim: store 8 vs expected 16"):
        st.require({"spec.head_dim": 16})


def test_a_root_edited_by_hand_is_refused_and_an_older_root_without_a_digest_opens(tmp_path):
    st = _build(tmp_path / "c", n=2)
    root = Path(st.url) / "zarr.json"
    clean = root.read_text()
    meta = json.loads(clean)
    meta["attributes"]["provenance"]["processor"] = "another@2"  # claims other prefixes for the same bytes
    root.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"zarr.json: its provenance / spec differ from what the build recorded"):
        Store.open(st.url)
    with pytest.raises(StoreError, match=r"edited after the build"):
        StoreWriter.create(st.url, PROV, st.spec, mode="resume")
    meta = json.loads(clean)
    meta["attributes"]["spec"]["head_dim"] = 16
    root.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"edited after the build"):
        Store.open(st.url)
    meta = json.loads(clean)
    del meta["attributes"]["root_sha256"]  # a store written before the digest: opens as before
    root.write_text(json.dumps(meta))
    assert Store.open(st.url).keys() == st.keys()


def test_a_store_of_another_schema_version_is_refused_naming_both(tmp_path):
    st = _build(tmp_path / "c", n=1)
    root = Path(st.url) / "zarr.json"
    meta = json.loads(root.read_text())
    meta["attributes"]["schema_version"] = 3
    root.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"schema_version 3; this code reads \(1, 2\)"):
        Store.open(st.url)
    with pytest.raises(StoreError, match=r"schema_version 3"):
        StoreWriter.create(st.url, PROV, st.spec, mode="resume")
    assert np.array_equal(sample_file_names(st.spec, st.manifest(0)["arrays"]),
                          sorted(expected_files(st.spec, st.manifest(0))))
