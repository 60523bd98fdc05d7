"""The pipeline end to end through the CLIs: world -> cache-build -> train -> resume -> eval -> export."""

import json

import pytest
import torch

from cache_builder import cache_build
from head_trainer import head_eval, head_export, head_train
from shared.checkpoint import AlpamayoCheckpoint, load_head_file
from shared.data import write_synthetic_world
from shared.store import Store


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    write_synthetic_world(root / "world", n_clips=4, seed=3, width=192, height=108, duration_s=12.0,
                          kinds=["sharp-left", "straight", "sharp-right", "gentle-left"])
    store = root / "store"
    rc = cache_build.main(["--dataset", str(root / "world"), "--checkpoint", str(tiny_checkpoint), "--out", str(store),
                           "--cameras", "front-only", "--keyframes", "stride:1", "--batch-size", "3"])
    assert rc == 0
    return root, store


def _train(store, out, *extra):
    return head_train.main(["--cache", str(store), "--out", str(out), "--split", "all", "--steps", "4",
                            "--batch-size", "2", "--warmup-steps", "1", "--save-every", "2", "--log-every", "1",
                            *extra])


def test_cache_build_contents_and_resume_refusal(built, tiny_checkpoint):
    root, store = built
    st = Store.open(str(store))
    assert len(st) >= 8  # several keyframes per clip
    t = st.table()
    assert set(t["camera_config"]) == {"front-only"} and all(n == 1 for n in t["n_cam"])
    assert st.provenance["prefix_mode"] == "teacher"
    assert st.provenance["head_config_hash"] == AlpamayoCheckpoint.open(tiny_checkpoint).head_config().hash()
    assert st.verify().ok
    # a second build into the same store without --resume is refused; with --resume nothing is redone
    args = ["--dataset", str(root / "world"), "--checkpoint", str(tiny_checkpoint), "--out", str(store),
            "--cameras", "front-only", "--keyframes", "stride:1"]
    assert cache_build.main(args) == 2
    summary = cache_build.build(cache_build.BuildConfig(**vars(_parse(args + ["--resume"]))))
    assert summary["written"] == 0 and summary["already_done"] == len(st)


def _parse(args):
    from shared.cli import parser_for

    return parser_for(cache_build.BuildConfig, "x", "x", ("dataset", "checkpoint")).parse_args(args)


def test_train_resume_equals_uninterrupted(built, tmp_path):
    _, store = built
    assert _train(store, tmp_path / "full") == 0
    assert _train(store, tmp_path / "cut", "--stop-after", "2") == 0
    assert (tmp_path / "cut/checkpoints/step_0000002").is_dir() and not (tmp_path / "cut/head.safetensors").exists()
    assert _train(store, tmp_path / "cut", "--resume") == 0
    a, meta = load_head_file(tmp_path / "full/head.safetensors")
    b, _ = load_head_file(tmp_path / "cut/head.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = AlpamayoCheckpoint.open(meta["base_checkpoint"]["path"]).head_state_dict()
    assert not torch.equal(a["action_out_proj.weight"], base["action_out_proj.weight"])  # it trained
    assert torch.equal(a["action_space.accel_std"], base["action_space.accel_std"])  # buffers untouched
    log = [json.loads(x) for x in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    # an existing run is never overwritten silently
    assert _train(store, tmp_path / "full") == 2


def test_eval_json_skip_plot_and_export(built, tmp_path, capsys):
    _, store = built
    assert _train(store, tmp_path / "run") == 0
    base_json, ft_json = tmp_path / "base.json", tmp_path / "ft.json"
    common = ["--cache", str(store), "--split", "all", "--num-samples", "3", "--steps", "4"]
    assert head_eval.main(common + ["--out", str(base_json)]) == 0
    res = json.loads(base_json.read_text())
    assert res["metadata"]["head"] is None and res["metadata"]["parameters"]["num_samples"] == 3
    assert {"min_ade", "ade", "fde", "min_fde", "min_ade/by_t=3.0"} <= set(res["summary"])
    assert len(res["per_sample"]) == len(Store.open(str(store)))
    row = res["per_sample"][0]
    assert len(row["pred_xy"]) == 3 and len(row["pred_xy"][0]) == 64 and len(row["gt_xy"]) == 64
    capsys.readouterr()
    assert head_eval.main(common + ["--out", str(base_json)]) == 0
    assert "up to date" in capsys.readouterr().out  # same metadata: skipped
    head = tmp_path / "run/head.safetensors"
    png = tmp_path / "cmp.png"
    assert head_eval.main(common + ["--out", str(ft_json), "--head", str(head), "--baseline", str(base_json),
                                    "--plot", str(png)]) == 0
    ft = json.loads(ft_json.read_text())
    assert ft["metadata"]["head"]["sha256"] and ft["summary"] != res["summary"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert head_export.main(["--head", str(head), "--out", str(tmp_path / "export")]) == 0
    exported = AlpamayoCheckpoint.open(tmp_path / "export").head_state_dict()
    state, _ = load_head_file(head)
    assert torch.equal(exported["expert.norm.weight"], state["expert.norm.weight"].to(exported["expert.norm.weight"].dtype))


def test_cli_errors_name_the_fix(built, tmp_path, capsys):
    _, store = built
    assert head_train.main(["--cache", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert head_eval.main(["--cache", str(store), "--out", str(tmp_path / "x.json"), "--head", "nope.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "nope.safetensors: no such file" in err
