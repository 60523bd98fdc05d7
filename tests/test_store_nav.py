"""Store schema v2 (Alpamayo 1.5 fields): camera ids, nav text, route span and the unguided suffix round
trip; the shared prefix is stored once; v1 (R1) stores keep their exact form and stay readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.store import SCHEMA_VERSION, KVSpec, Store, StoreWriter, synthetic_sample
from shared.store.format import SCHEMA_VERSION_NAV
from shared.store.nav import unguided_kv

PROV = dict(checkpoint="tiny15@abc", head_config_hash="h1", processor="proc@1", prefix_mode="teacher",
            dataset_revision="r1", code_version="test")
TINY = dict(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10))


def nav_sample(seed: int, spec: KVSpec, route: bool):
    s = synthetic_sample(seed, spec, prefix_len=40, n_cam=2)
    s.camera_ids = (1, 6)
    if route:
        s.nav_text, s.route_span = f"Turn left in {seed + 10}m", (25, 33)
        g = torch.Generator().manual_seed(100 + seed)
        n = 40 - 33 - 1
        s.unguided_k = torch.randn(spec.num_layers, spec.num_kv_heads, n, spec.head_dim, generator=g).to(spec.torch_dtype)
        s.unguided_v = torch.randn(spec.num_layers, spec.num_kv_heads, n, spec.head_dim, generator=g).to(spec.torch_dtype)
    return s


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("unguided", [False, True])
def test_navigation_fields_round_trip(tmp_path, kv_dtype, unguided):
    spec = KVSpec(**TINY, kv_dtype=kv_dtype, navigation=True, unguided=unguided)
    ss = [nav_sample(i, spec, route=i % 2 == 0) for i in range(4)]
    with StoreWriter.create(str(tmp_path / "c"), PROV, spec) as w:
        for s in ss:
            w.write(s)
    st = Store.open(str(tmp_path / "c"))
    assert st.schema_version == SCHEMA_VERSION_NAV == 2 and st.spec == spec and st.verify().ok
    for s in ss:
        got, m = st.read(s.key), st.manifest(s.key)
        assert m["schema_version"] == 2
        assert (got.camera_ids, got.nav_text, got.route_span) == ((1, 6), s.nav_text, s.route_span)
        assert torch.equal(got.k, s.k) and torch.equal(got.v, s.v)
        if s.route_span is None:
            assert m["unguided_len"] == 40 and "kv_unguided" not in m["arrays"]
            continue
        assert m["unguided_len"] == 40 - 9
        if not unguided:
            assert "kv_unguided" not in m["arrays"]
            continue
        assert m["arrays"]["kv_unguided"]["shape"] == [2, 2, 2, 6, 8]  # only the 6 tokens after the route
        uk, uv = st.read_unguided(s.key)
        assert torch.equal(uk, s.unguided_k) and torch.equal(uv, s.unguided_v)
        fk, fv = unguided_kv(got.k, got.v, uk, uv, 25)
        assert fk.shape == (2, 2, 31, 8)
        assert torch.equal(fk[:, :, :25], s.k[:, :, :25]) and torch.equal(fv[:, :, 25:], s.unguided_v)


def test_v1_store_keeps_its_form_and_reads_without_nav_fields(tmp_path):
    spec = KVSpec(**TINY)
    s = synthetic_sample(0, spec)
    with StoreWriter.create(str(tmp_path / "c"), PROV, spec) as w:
        w.write(s)
    root = json.loads((Path(tmp_path / "c") / "zarr.json").read_text())["attributes"]
    assert root["schema_version"] == SCHEMA_VERSION == 1 and root["provenance"]["schema_version"] == 1
    assert sorted(root["spec"]) == ["chunk_mb", "codec", "head_dim", "hidden_size", "kv_dtype", "num_kv_heads",
                                    "num_layers", "quant", "shard", "store_hidden", "thumb_hw"]
    st = Store.open(str(tmp_path / "c"))
    m = st.manifest(0)
    assert m["schema_version"] == 1 and not {"camera_ids", "nav_text", "route_span", "unguided_len"} & set(m)
    got = st.read(0)
    assert got.camera_ids is None and got.nav_text is None and got.route_span is None


def test_bad_navigation_samples_are_refused(tmp_path):
    spec = KVSpec(**TINY, navigation=True, unguided=True)
    cases = [
        (lambda s: setattr(s, "camera_ids", (6, 1)), "ascending"),
        (lambda s: setattr(s, "camera_ids", (1,)), "one index per camera"),
        (lambda s: setattr(s, "route_span", None), "go together"),
        (lambda s: setattr(s, "route_span", (30, 39)), "route_span"),
        (lambda s: setattr(s, "unguided_k", s.unguided_k[:, :, :3]), "unguided_k must be"),
    ]
    for i, (breaker, msg) in enumerate(cases):
        s = nav_sample(0, spec, route=True)
        breaker(s)
        with StoreWriter.create(str(tmp_path / f"c{i}"), PROV, spec) as w, pytest.raises(ValueError, match=msg):
            w.write(s)
    with pytest.raises(ValueError, match="navigation=True"):
        KVSpec(**TINY, unguided=True)
    plain = KVSpec(**TINY)
    with StoreWriter.create(str(tmp_path / "p"), PROV, plain) as w, pytest.raises(ValueError, match="without navigation"):
        w.write(nav_sample(0, plain, route=True))
