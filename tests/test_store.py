"""Cache store: round trips (bitwise for fp32 and bf16), quantised reads, layout options, table/select,
provenance / schema refusal, input validation, verify catching corruption, torn writes."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import shared.store as store_mod
from shared import kv_quant
from shared.store import (
    SCHEMA_VERSION,
    CachedSample,
    KVSpec,
    Store,
    StoreError,
    StoreWriter,
    estimate_sample_bytes,
    sample_id,
    synthetic_sample,
    unescape_sid,
)

PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="sft-no-cot",
            dataset_revision="r1", code_version="test")
TINY = dict(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)


def assert_same(a: CachedSample, b: CachedSample, kv_exact: bool = True) -> None:
    assert a.key == b.key
    if kv_exact:
        assert a.k.dtype == b.k.dtype and torch.equal(bits(a.k), bits(b.k))
        assert torch.equal(bits(a.v), bits(b.v))
    if a.hidden is not None or b.hidden is not None:
        assert torch.equal(bits(a.hidden), bits(b.hidden))
    assert torch.equal(a.token_ids, b.token_ids) and b.token_ids.dtype == torch.int64
    for n in ("thumbs", "ego_history_xyz", "ego_history_rot", "ego_future_xyz", "ego_future_rot", "gt_action"):
        x, y = getattr(a, n), getattr(b, n)
        assert x.dtype == y.dtype and np.array_equal(x, y), n
    for n in ("prefix_len", "rope_delta", "v0", "clip_id", "t0_us", "camera_config", "split", "curvature",
              "reasoning", "camera_names"):
        assert getattr(a, n) == getattr(b, n), n


def build(path, spec, n=6, **kw) -> list[CachedSample]:
    ss = [synthetic_sample(i, spec) for i in range(n)]
    with StoreWriter.create(str(path), PROV, spec, **kw) as w:
        for s in ss:
            w.write(s)
    return ss


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("codec,shard", [("zstd", False), ("none", False), ("blosc-lz4", True)])
def test_roundtrip_bitwise(tmp_path, kv_dtype, codec, shard):
    spec = KVSpec(**TINY, kv_dtype=kv_dtype, codec=codec, shard=shard)
    ss = build(tmp_path / "c", spec)
    st = Store.open(str(tmp_path / "c"))
    assert len(st) == 6 and st.keys() == sorted(s.key for s in ss)
    assert st.spec == spec and st.provenance["kv_dtype"] == kv_dtype and st.schema_version == SCHEMA_VERSION
    for s in ss:
        assert_same(s, st.read(s.key))
    # index access follows the sorted key order
    assert st.read(0).key == st.keys()[0]
    assert st.verify().ok


def test_bf16_special_bit_patterns(tmp_path):
    spec = KVSpec(**TINY, kv_dtype="bfloat16")
    s = synthetic_sample(0, spec)
    flat = s.k.view(torch.int16).view(-1)
    flat[:4] = torch.tensor([0x0000, -32768, 0x0001, 0x7F7F], dtype=torch.int16)  # +0, -0, subnormal, max
    build_one = [s]
    with StoreWriter.create(str(tmp_path / "c"), PROV, spec) as w:
        w.write(build_one[0])
    assert torch.equal(Store.open(str(tmp_path / "c")).read(0).k.view(torch.int16), s.k.view(torch.int16))


def test_layer_subset_reads(tmp_path):
    spec = KVSpec(num_layers=6, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10), chunk_mb=1e-3)
    ss = build(tmp_path / "c", spec, n=2)
    st = Store.open(str(tmp_path / "c"))
    full = st.read(ss[1].key)
    for layers in ([4], [1, 2, 3], [5, 0, 2], slice(2, 6, 2), -1):
        part = st.read(ss[1].key, layers=layers, with_hidden=False)
        idx = list(range(6))[layers] if isinstance(layers, slice) else ([5] if layers == -1 else layers)
        assert part.layers == tuple(idx)
        assert torch.equal(part.k, full.k[idx]) and torch.equal(part.v, full.v[idx]) and part.hidden is None
    with pytest.raises(IndexError):
        st.read(0, layers=[6])


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_store_matches_quantiser(tmp_path, quant):
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=32, hidden_size=16, thumb_hw=(6, 10), quant=quant,
                  kv_dtype="float32")
    ss = build(tmp_path / "c", spec, n=3)
    st = Store.open(str(tmp_path / "c"))
    for s in ss:
        r = st.read(s.key)
        k_ref, v_ref = kv_quant.dequantize_kv(kv_quant.quantize_kv(s.k, s.v, quant), quant, torch.float32)
        assert torch.equal(r.k, k_ref) and torch.equal(r.v, v_ref)  # the store adds no error of its own
        assert kv_quant.rel_rmse(s.k, r.k) < {"int8": 0.01, "int4": 0.09}[quant]
        assert_same(s, r, kv_exact=False)  # hidden stays lossless
        sub = st.read(s.key, layers=[2])
        assert torch.equal(sub.k[0], r.k[2]) and torch.equal(sub.v[0], r.v[2])
    assert st.verify().ok
    assert st.manifest(0)["arrays"]["kv"]["dtype"] == ("int8" if quant == "int8" else "uint8")


def test_store_hidden_disabled(tmp_path):
    spec = KVSpec(**TINY, store_hidden=False)
    build(tmp_path / "c", spec, n=2)
    st = Store.open(str(tmp_path / "c"))
    assert st.read(0).hidden is None and "hidden" not in st.manifest(0)["arrays"] and st.verify().ok


def test_table_and_select(tmp_path):
    spec = KVSpec(**TINY)
    ss = build(tmp_path / "c", spec, n=8)
    st = Store.open(str(tmp_path / "c"))
    t = st.table()
    assert t.num_rows == 8 and t["key"] == st.keys()
    assert {"split", "camera_config", "curvature_max_abs", "prefix_len", "reasoning"} <= set(t.column_names)
    val = t.filter(lambda r: r["split"] == "val")
    assert sorted(val["key"]) == sorted(s.key for s in ss if s.split == "val") and val.num_rows > 0
    sub = st.select(val)
    assert sub.keys() == val["key"] and len(sub) == val.num_rows
    assert sub.read(0).split == "val"
    by_key = st.select([ss[3].key, ss[1].key])
    assert by_key.keys() == [ss[3].key, ss[1].key]
    assert st.select([2, 0]).keys() == [st.keys()[2], st.keys()[0]]
    with pytest.raises(KeyError):
        st.select(["nope@1"])


def test_modes_and_provenance_refusal(tmp_path):
    spec = KVSpec(**TINY)
    url = str(tmp_path / "c")
    build(url, spec, n=2)
    with pytest.raises(FileExistsError, match="--resume"):
        StoreWriter.create(url, PROV, spec, mode="new")
    other = {**PROV, "checkpoint": "tiny@def", "dataset_revision": "r2"}
    with pytest.raises(StoreError, match=r"differing keys: checkpoint, dataset_revision") as ei:
        StoreWriter.create(url, other, spec, mode="resume")
    assert "'tiny@abc'" in str(ei.value) and "'tiny@def'" in str(ei.value)
    with pytest.raises(StoreError, match=r"kv_dtype, quant, spec\.kv_dtype, spec\.quant"):
        StoreWriter.create(url, PROV, KVSpec(**TINY, kv_dtype="float32", quant="int8"), mode="resume")
    w = StoreWriter.create(url, PROV, spec, mode="resume")
    assert len(w.done_keys()) == 2
    w.close()
    w = StoreWriter.create(url, other, spec, mode="overwrite")
    assert w.done_keys() == set()
    w.close()
    st = Store.open(url)
    assert len(st) == 0 and st.provenance["checkpoint"] == "tiny@def"


def test_bad_provenance_and_spec():
    with pytest.raises(ValueError, match="lacks required keys.*processor"):
        store_mod.normalize_provenance({k: v for k, v in PROV.items() if k != "processor"}, KVSpec(**TINY))
    with pytest.raises(ValueError, match="contradicts"):
        store_mod.normalize_provenance({**PROV, "quant": "int8"}, KVSpec(**TINY))
    with pytest.raises(ValueError, match="kv_dtype"):
        KVSpec(**TINY, kv_dtype="float16")
    with pytest.raises(ValueError, match="codec"):
        KVSpec(**TINY, codec="lz4")
    with pytest.raises(ValueError, match="even head_dim"):
        KVSpec(num_layers=1, num_kv_heads=1, head_dim=7, hidden_size=4, quant="int4")


def test_open_refusals(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cache at .*cache-build"):
        Store.open(str(tmp_path / "missing"))
    url = tmp_path / "c"
    build(url, KVSpec(**TINY), n=1)
    meta = json.loads((url / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 999
    (url / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema_version 999"):
        Store.open(str(url))
    with pytest.raises(StoreError, match="schema_version 999"):
        StoreWriter.create(str(url), PROV, KVSpec(**TINY), mode="resume")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(StoreError, match="not a cache store"):
        StoreWriter.create(str(tmp_path / "junk"), PROV, KVSpec(**TINY), mode="resume")


def test_bad_sample_inputs(tmp_path):
    spec = KVSpec(**TINY, kv_dtype="bfloat16")
    w = StoreWriter.create(str(tmp_path / "c"), PROV, spec)
    good = synthetic_sample(0, spec)

    def variant(**kw):
        return CachedSample(**{**good.__dict__, **kw})

    cases = [
        (variant(k=good.k.float()), "kv_dtype is bfloat16"),
        (variant(v=good.v[:, :, :-1]), "v must be a tensor of shape"),
        (variant(key="other@1"), "key must be"),
        (variant(hidden=None), "hidden is None"),
        (variant(thumbs=good.thumbs[..., :2]), "thumbs must be"),
        (variant(gt_action=good.gt_action.astype(np.float64)), "gt_action must be float32"),
        (variant(ego_future_xyz=np.full((64, 3), np.nan)), "ego_future_xyz has NaN"),
        (variant(token_ids=good.token_ids[:-1]), "token_ids must be"),
        (variant(split=""), "split must be"),
    ]
    for s, msg in cases:
        with pytest.raises(ValueError, match=msg):
            w.write(s)
    w.write(good)
    with pytest.raises(ValueError, match="already in"):
        w.write(good)
    w.close()
    with pytest.raises(ValueError, match="already in"):
        StoreWriter.create(str(tmp_path / "c"), PROV, spec, mode="resume").write(good)


def test_verify_catches_corruption_and_nan(tmp_path):
    spec = KVSpec(**TINY, codec="none", kv_dtype="float32")
    url = tmp_path / "c"
    ss = build(url, spec, n=3)
    bad = synthetic_sample(10, spec)
    bad.k[0, 0, 0, 0] = float("nan")
    with StoreWriter.create(str(url), PROV, spec, mode="resume") as w:
        w.write(bad)
    st = Store.open(str(url))
    rep = st.verify()
    assert not rep.ok and any("NaN/Inf" in e for e in rep.errors) and bad.key in str(rep)
    # flip one byte of an (uncompressed) KV chunk of a good sample
    sdir = url / "samples" / sample_id(ss[0].key) / "kv"
    chunk = sorted(p for p in sdir.iterdir() if p.name.startswith("c"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    rep = Store.open(str(url)).verify()
    assert any(ss[0].key in e and "checksum" in e for e in rep.errors)
    assert Store.open(str(url)).verify(data=False).errors == [e for e in rep.errors if "NaN/Inf values in" in e]


def test_torn_write_is_invisible_and_resumed(tmp_path, monkeypatch):
    """A writer dying after the arrays but before its manifest leaves nothing visible."""
    spec = KVSpec(**TINY)
    url = str(tmp_path / "c")
    ss = [synthetic_sample(i, spec) for i in range(3)]
    real_put = store_mod._Loc.put_atomic

    def failing_put(self, path, data):
        if "/commits/" in path and sample_id(ss[1].key) in path:
            raise OSError("simulated crash before commit")
        return real_put(self, path, data)

    monkeypatch.setattr(store_mod._Loc, "put_atomic", failing_put)
    w = StoreWriter.create(url, PROV, spec)
    for s in ss:
        w.write(s)
    with pytest.raises(StoreError, match="simulated crash"):
        w.flush()
    monkeypatch.setattr(store_mod._Loc, "put_atomic", real_put)
    st = Store.open(url)
    assert ss[1].key not in st and len(st) == 2
    assert os.path.isdir(os.path.join(url, "samples", sample_id(ss[1].key)))  # orphan arrays exist...
    rep = st.verify()
    assert rep.ok and "uncommitted" in rep.warnings[0]  # ...but are invisible, and only a warning
    w2 = StoreWriter.create(url, PROV, spec, mode="resume")
    assert ss[1].key not in w2.done_keys()
    w2.write(ss[1])
    w2.close()
    st = Store.open(url)
    assert_same(ss[1], st.read(ss[1].key))
    assert st.verify().warnings == []  # the orphan became the committed sample


def test_background_error_surfaces(tmp_path, monkeypatch):
    spec = KVSpec(**TINY)
    w = StoreWriter.create(str(tmp_path / "c"), PROV, spec)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(zarr, "create_array", boom)
    w.write(synthetic_sample(0, spec))
    with pytest.raises(StoreError, match="disk full"):
        w.close()


def test_bytes_and_estimate(tmp_path):
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=32, hidden_size=64, thumb_hw=(6, 10))
    ss = [synthetic_sample(i, spec, prefix_len=200) for i in range(3)]
    with StoreWriter.create(str(tmp_path / "c"), PROV, spec) as w:
        for s in ss:
            w.write(s)
    est = estimate_sample_bytes(spec, 200, n_cam=2)
    assert est.kv_logical_bytes == 2 * 4 * 2 * 200 * 32 * 2
    assert w.bytes_logical == 3 * est.logical_bytes
    du = sum(f.stat().st_size for f in (tmp_path / "c" / "samples").rglob("*") if f.is_file())
    du += sum(f.stat().st_size for f in (tmp_path / "c" / "commits").rglob("*") if f.is_file())
    assert w.bytes_stored == du
    assert 0.5 < est.stored_bytes * 3 / du < 2.0
    assert Store.open(str(tmp_path / "c")).summary()["bytes_stored"] == du


def test_sample_id_roundtrip():
    for key in ["a@1", "clip/with:odd chars@5", "_x@1", ".hidden@2", "~tilde@3", "ünï@4", "__a@0"]:
        sid = sample_id(key)
        assert "/" not in sid and not sid.startswith((".", "_")) and unescape_sid(sid) == key
    assert len({sample_id(k) for k in ["a b", "a~20b", "a_b"]}) == 3


def test_writer_id_validated(tmp_path):
    with pytest.raises(ValueError, match="writer_id"):
        StoreWriter.create(str(tmp_path / "c"), PROV, KVSpec(**TINY), writer_id="a/b")


def test_default_url():
    assert store_mod.default_store_url("run1") == "cache/run1"
    assert store_mod.default_store_url("s3://b/x") == "s3://b/x"
    assert store_mod.default_store_url(str(Path("/tmp/x"))) == "/tmp/x"
