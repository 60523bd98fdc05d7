"""What leaves the tool, evaluated: an exported checkpoint evaluates as the trained head does (within
bf16, the release's weight dtype), and `head-eval --live` finds the cache equal to what the VLM computes."""

from __future__ import annotations

import json

import pytest
import torch

from cache_builder import cache_build
from head_trainer import head_eval, head_export
from shared.checkpoint import AlpamayoCheckpoint, load_head_file, save_head
from shared.data import write_synthetic_world
from shared.store import Store
from shared.tiny_checkpoint import write_tiny_checkpoint

EVAL = ["--split", "all", "--num-samples", "3", "--steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def world_store(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    write_synthetic_world(root / "world", n_clips=2, seed=11, width=192, height=108, duration_s=12.0,
                          kinds=["sharp-left", "straight"])
    store = root / "store"
    assert cache_build.main(["--dataset", str(root / "world"), "--checkpoint", str(tiny_checkpoint), "--out",
                             str(store), "--cameras", "front-only", "--keyframes", "stride:3", "--kv-dtype",
                             "float32", "--max-samples", "4"]) == 0
    return root, store


def _summary(path):
    return json.loads(path.read_text())["summary"]


def test_export_evaluates_as_the_trained_head(world_store, tmp_path):
    _, store = world_store
    base = write_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)  # the release's weight dtype
    ck = AlpamayoCheckpoint.open(base)
    head = ck.load_head(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a "trained" fp32 head: off the bf16 grid, as fp32 master weights are
        for p in head.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean())
    meta = {"base_checkpoint": {"path": str(base)}}
    trained = save_head(head, tmp_path / "head.safetensors", meta)
    cast = save_head(head, tmp_path / "head_bf16.safetensors", meta, dtype=torch.bfloat16)
    out = tmp_path / "export"
    assert head_export.main(["--head", str(trained), "--out", str(out)]) == 0
    # the store was built from the fp32 tiny checkpoint; evaluating it with the bf16 one is a mismatch on purpose
    common = ["--cache", str(store), *EVAL, "--allow-store-mismatch"]
    runs = {  # name: (checkpoint, head file or None, eval dtype)
        "trained_bf16": (base, trained, "bfloat16"), "export_bf16": (out, None, "bfloat16"),
        "trained_fp32": (base, trained, "float32"), "export_fp32": (out, None, "float32"),
        "cast_fp32": (base, cast, "float32"),
    }
    res = {}
    for name, (ckpt_dir, head_file, dtype) in runs.items():
        args = common + ["--checkpoint", str(ckpt_dir), "--dtype", dtype, "--out", str(tmp_path / f"{name}.json")]
        assert head_eval.main(args + (["--head", str(head_file)] if head_file else [])) == 0
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())

    def same(x, y):
        return x["summary"] == y["summary"] and [r["pred_xy"] for r in x["per_sample"]] == \
            [r["pred_xy"] for r in y["per_sample"]]

    # run in bf16 (the release's dtype), the export and the trained head give the same predictions, bit for bit
    assert same(res["trained_bf16"], res["export_bf16"])
    # in fp32 the export is exactly the trained head rounded to bf16 ...
    assert same(res["export_fp32"], res["cast_fp32"])
    # ... which is all that separates it from the fp32 head (so the comparisons above are not vacuous)
    assert res["trained_fp32"]["summary"] != res["export_fp32"]["summary"]
    exported = AlpamayoCheckpoint.open(out).head_state_dict()
    state, _ = load_head_file(trained)
    assert all(torch.equal(exported[k], state[k].to(exported[k].dtype)) for k in state
               if not (k.startswith("action_space.") or k.endswith(".freqs")))


def test_live_eval_agrees_with_the_cache(world_store, tmp_path, capsys):
    root, store = world_store
    assert Store.open(str(store)).provenance["pixels"] == "inference"
    out = tmp_path / "live.json"
    assert head_eval.main(["--cache", str(store), "--out", str(out), *EVAL, "--live", "2"]) == 0
    live = json.loads(out.read_text())["live"]
    s = live["summary"]
    assert s["samples"] == 2 and s["token_ids_equal"] == s["token_ids_checked"] == 2 and s["rope_delta_equal"] == 2
    assert s["k_max_abs_diff"] <= 1e-5 and s["v_max_abs_diff"] <= 1e-5  # fp32 store, same CPU kernels
    assert s["traj_max_abs_diff_m"] <= 1e-4
    assert all(d["max_abs_diff"] <= 1e-4 for d in s["metrics"].values())
    assert "live check on 2 samples" in capsys.readouterr().out
    # with the other pixel path than the store's it reports the disagreement (and so tells the two apart)
    from head_trainer.live import LivePrefixer, live_agreement

    st = Store.open(str(store))
    ck = AlpamayoCheckpoint.open(st.provenance["checkpoint"]["path"])
    prefixer = LivePrefixer(st, ck, torch.device("cpu"))
    prefixer.pixels = "stage2"
    head = ck.load_head(dtype=torch.float32)
    bad = live_agreement(st, st.keys()[:1], head, prefixer, num_samples=2, steps=2, seed=0,
                         device=torch.device("cpu"))["summary"]
    assert bad["token_ids_equal"] == 1 and bad["k_max_abs_diff"] > 1e-4 and bad["traj_max_abs_diff_m"] > 0
