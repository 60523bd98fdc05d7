"""The pipeline on a tiny Alpamayo 1.5 checkpoint: world -> cache-build (1.5 prompt, generated navigation,
unguided suffix) -> train -> eval -> export, and the stored unguided suffix against a no-route build."""

from __future__ import annotations

import json

import pytest
import torch

from cache_builder import cache_build
from head_trainer import head_eval, head_export, head_train
from shared.checkpoint import INDEX_NAME, AlpamayoCheckpoint, load_head_file
from shared.data import write_synthetic_world
from shared.store import Store
from shared.store.nav import unguided_kv
from shared.tiny_checkpoint15 import write_tiny_checkpoint15


@pytest.fixture(scope="module")
def built15(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e15")
    ckpt = write_tiny_checkpoint15(root / "tiny15", dtype=torch.float32)
    write_synthetic_world(root / "world", n_clips=2, seed=5, width=192, height=108, duration_s=10.0,
                          kinds=["sharp-left", "straight"])
    common = ["--dataset", str(root / "world"), "--checkpoint", str(ckpt), "--cameras", "front-only",
              "--keyframes", "stride:2", "--batch-size", "2", "--kv-dtype", "float32", "--no-hidden"]
    assert cache_build.main(common + ["--out", str(root / "nav"), "--navigation", "generate", "--unguided"]) == 0
    assert cache_build.main(common + ["--out", str(root / "plain")]) == 0
    return root, ckpt


def test_store_holds_1_5_fields_and_the_unguided_suffix_equals_a_no_route_build(built15):
    root, _ = built15
    nav, plain = Store.open(str(root / "nav")), Store.open(str(root / "plain"))
    assert nav.schema_version == 2 and nav.spec.navigation and nav.spec.unguided
    assert nav.provenance["prompt"]["layout"] == "sft" and nav.provenance["navigation"]["source"] == "generate"
    assert nav.provenance["checkpoint"]["model_type"] == "alpamayo1_5"
    assert nav.keys() == plain.keys() and nav.verify().ok
    routed = 0
    for key in nav.keys():
        a, b = nav.read(key), plain.read(key)
        assert a.camera_ids == (1,) and b.nav_text is None and b.route_span is None
        if a.route_span is None:
            assert a.nav_text is None and torch.equal(a.k, b.k)
            continue
        routed += 1
        assert a.nav_text.startswith("Turn ") and a.prefix_len == b.prefix_len + a.route_span[1] - a.route_span[0] + 1
        uk, uv = nav.read_unguided(key)
        fk, fv = unguided_kv(a.k, a.v, uk, uv, a.route_span[0])
        torch.testing.assert_close(fk, b.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fv, b.v, rtol=1e-5, atol=1e-5)
    assert 0 < routed < len(nav)  # turning keyframes get a route, straight ones none


def test_train_eval_export_on_1_5(built15, tmp_path):
    root, ckpt = built15
    store = str(root / "nav")
    assert head_train.main(["--cache", store, "--out", str(tmp_path / "run"), "--split", "all", "--steps", "2",
                            "--batch-size", "2", "--warmup-steps", "1", "--log-every", "1"]) == 0
    state, meta = load_head_file(tmp_path / "run/head.safetensors")
    assert meta["base_checkpoint"]["model_type"] == "alpamayo1_5"
    out = tmp_path / "eval.json"
    assert head_eval.main(["--cache", store, "--split", "all", "--num-samples", "2", "--steps", "4",
                           "--head", str(tmp_path / "run/head.safetensors"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())
    assert head_export.main(["--head", str(tmp_path / "run/head.safetensors"), "--out", str(tmp_path / "export")]) == 0
    src = json.loads((ckpt / INDEX_NAME).read_text())["weight_map"]
    exp = json.loads((tmp_path / "export" / INDEX_NAME).read_text())["weight_map"]
    assert set(exp) == set(src)
    assert (tmp_path / "export/config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    assert AlpamayoCheckpoint.open(tmp_path / "export").release.model_type == "alpamayo1_5"


def test_eval_without_route_and_with_guidance(built15, tmp_path):
    root, _ = built15
    common = ["--split", "all", "--num-samples", "2", "--steps", "4"]

    def run(store, name, *extra):
        assert head_eval.main(["--cache", str(root / store), "--out", str(tmp_path / name), *common, *extra]) == 0
        return json.loads((tmp_path / name).read_text())

    nonav, plain = run("nav", "nonav.json", "--navigation", "none"), run("plain", "plain.json")
    for a, b in zip(nonav["per_sample"], plain["per_sample"]):  # unguided prefix = the no-route build's prefix
        assert a["key"] == b["key"]
        assert all(abs(a["metrics"][k] - b["metrics"][k]) <= 1e-3 * max(1.0, abs(b["metrics"][k])) for k in a["metrics"])
    guided = run("nav", "w15.json", "--guidance-weight", "1.5", "--noise-temperature", "0.6")
    assert guided["metadata"]["parameters"]["guidance_weight"] == 1.5
    assert "guidance_weight" not in plain["metadata"]["parameters"]  # R1-form metadata unchanged
    assert head_eval.main(["--cache", str(root / "nav"), "--out", str(tmp_path / "y.json"), *common,
                           "--navigation", "none", "--guidance-weight", "2"]) == 2


def test_unguided_mix_trains_on_a_recorded_no_route_share(built15, tmp_path):
    from head_trainer.data import read_raw
    from head_trainer.route_mix import mix_indices

    root, _ = built15
    store = Store.open(str(root / "nav"))
    idx, info = mix_indices(store, list(range(len(store))), 0.9, seed=0)
    routed = [i for i in range(len(store)) if store.manifest(i)["route_span"]]
    assert info["no_route_fraction"] >= 0.9 or info["unguided_variants"] == len(routed)
    extra = [i - len(store) for i in idx[len(store):]]
    assert extra and set(extra) <= set(routed)
    j = extra[0]
    raw, s = read_raw(store, j + len(store)), store.read(j)
    k, _ = unguided_kv(s.k, s.v, *store.read_unguided(j), s.route_span[0])
    assert raw["L"] == k.shape[2] and torch.equal(raw["kv"][:, 0], k)
    assert mix_indices(store, [0, 1], 0.0, 0) == ([0, 1], {})
    with pytest.raises(ValueError, match="unguided-mix"):
        mix_indices(store, [0], 1.0, 0)
    assert head_train.main(["--cache", str(root / "nav"), "--out", str(tmp_path / "mix"), "--split", "all",
                            "--steps", "2", "--batch-size", "2", "--warmup-steps", "1", "--unguided-mix", "0.9"]) == 0
    assert json.loads((tmp_path / "mix/config.json").read_text())["unguided_mix"]["rate"] == 0.9
