"""head-train / head-eval on bad data and bad pairings: a damaged sample is refused naming it, or with
--skip-bad-samples left out and reported (summary.json / the eval JSON); a store, checkpoint or head
made for something else is refused naming what differs; a plan too large for host RAM is refused
before anything loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_store import write_train_store

from head_trainer import data, head_eval, head_train
from shared.checkpoint import AlpamayoCheckpoint, load_head_file, save_head
from shared.store import Store, sample_id


def args(store, out, *extra):
    return ["--cache", str(store), "--out", str(out), "--steps", "4", "--batch-size", "2", "--warmup-steps", "1",
            "--save-every", "2", "--log-every", "1", "--val-every", "2", "--val-ade-items", "0", "--no-tensorboard",
            *extra]


def eval_args(store, out, *extra):
    return ["--cache", str(store), "--out", str(out), "--split", "all", "--num-samples", "2", "--steps", "2",
            "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def clean(tiny_checkpoint, tmp_path_factory):
    return write_train_store(tmp_path_factory.mktemp("clean") / "store", tiny_checkpoint, codec="none")


@pytest.fixture(scope="module")
def damaged(tiny_checkpoint, tmp_path_factory):
    """One train sample's KV chunk with flipped bytes, one val sample's KV chunk file deleted."""
    path = write_train_store(tmp_path_factory.mktemp("bad") / "store", tiny_checkpoint, codec="none")
    st = Store.open(str(path))
    train_key = next(k for k in st.keys() if st.manifest(k)["split"] == "train")
    val_key = next(k for k in st.keys() if st.manifest(k)["split"] == "val")
    chunk = sorted((path / "samples" / sample_id(train_key) / "kv").glob("c*"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    sorted((path / "samples" / sample_id(val_key) / "kv").glob("c*"))[0].unlink()
    return path, train_key, val_key


def test_skip_bad_samples_in_head_train(damaged, tmp_path, capsys):
    store, train_key, val_key = damaged
    assert head_train.main(args(store, tmp_path / "refused", "--ram-cache-gb", "0")) == 1  # the default: refuse
    err = capsys.readouterr().err
    assert f"sample {train_key!r}" in err and "checksum mismatch" in err and "add --skip-bad-samples" in err
    runs = {}
    for ram in ("0", "2"):  # samples read by the loader / all held in the RAM tier: the same run
        out = tmp_path / f"ram{ram}"
        assert head_train.main(args(store, out, "--skip-bad-samples", "--ram-cache-gb", ram)) == 0
        err = capsys.readouterr().err
        skipped = json.loads((out / "summary.json").read_text())["skipped_samples"]
        assert set(skipped) == {train_key, val_key}
        assert "checksum mismatch" in skipped[train_key] and "file missing" in skipped[val_key]
        assert "head-train: skipped 2 damaged samples (--skip-bad-samples): " in err and train_key in err
        runs[ram] = load_head_file(out / "head.safetensors")[0]
    assert all(torch.equal(runs["0"][k], runs["2"][k]) for k in runs["0"])
    # stopped on the damaged sample (seed 2: first read in step 4, after the step-2 checkpoint), then resumed
    # with the flag (a run-time flag): the same run as skipping throughout
    cut, ref, once = tmp_path / "cut", tmp_path / "ref", ("--ram-cache-gb", "0", "--val-every", "0", "--seed", "2")
    assert head_train.main(args(store, cut, *once)) == 1
    assert f"sample {train_key!r}" in capsys.readouterr().err
    assert (cut / "checkpoints/step_0000002").is_dir()
    assert head_train.main(args(store, ref, *once, "--skip-bad-samples")) == 0
    assert head_train.main(args(store, cut, *once, "--resume", "--skip-bad-samples")) == 0
    a, b = load_head_file(ref / "head.safetensors")[0], load_head_file(cut / "head.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_skipped_samples_never_reach_a_batch_and_batches_keep_their_size(damaged):
    store, train_key, _ = damaged
    st = Store.open(str(store))
    idx = data.split_indices(st, "train")
    bad = st.keys().index(train_key)
    loader = data.make_loader(str(store), idx, 3, 0, 0, 8, skip_bad=True)
    seen = []
    for (b,) in loader:
        assert len(b.keys) == 3
        seen += b.keys
    assert train_key not in seen and loader.skipped.keys() == {train_key}
    # its place goes to the next readable training sample in store order; the other positions are unchanged
    sampler = data.StepBatchSampler(idx, 3, 0, 0, 8)
    want = [st.keys()[i] if i != bad else st.keys()[idx[idx.index(bad) + 1]] for mb in sampler for i in mb]
    assert seen == want


def test_skip_bad_samples_in_head_eval(damaged, clean, tmp_path, capsys):
    store, train_key, val_key = damaged
    assert head_eval.main(eval_args(store, tmp_path / "a.json")) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("head-eval:   0%")]
    first = min(train_key, val_key)  # samples are read in key order
    assert len(err) == 1 and f"sample {first!r}" in err[0] and "--skip-bad-samples" in err[0]
    assert err[0].startswith("head-eval: error: ")
    assert head_eval.main(eval_args(store, tmp_path / "b.json", "--skip-bad-samples")) == 0
    assert "skipped 2 damaged samples" in capsys.readouterr().err
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res["skipped_samples"]) == {train_key, val_key}
    n = len(Store.open(str(store)))
    assert sorted(r["key"] for r in res["per_sample"]) == sorted(set(Store.open(str(store)).keys())
                                                                  - {train_key, val_key})
    assert len(res["per_sample"]) == n - 2 and res["metadata"]["parameters"]["skip_bad_samples"] is True
    # a clean store with the flag: nothing skipped, and the same numbers as without it
    assert head_eval.main(eval_args(clean, tmp_path / "c.json", "--skip-bad-samples")) == 0
    assert head_eval.main(eval_args(clean, tmp_path / "d.json")) == 0
    c, d = (json.loads((tmp_path / f).read_text()) for f in ("c.json", "d.json"))
    assert c["skipped_samples"] == {} and c["per_sample"] == d["per_sample"] and "skipped_samples" not in d


def _edit_provenance(store: Path, **changes) -> None:
    """Make the store look built with other provenance (its recorded digest too: a consistent root)."""
    from shared.store.format import root_digest

    root = store / "zarr.json"
    doc = json.loads(root.read_text())
    attrs = doc["attributes"]
    attrs["provenance"].update(changes)
    attrs["root_sha256"] = root_digest(attrs["provenance"], attrs["spec"])
    root.write_text(json.dumps(doc))


def test_wrong_pairings_are_refused_naming_what_differs(clean, tiny_checkpoint, tmp_path, capsys):
    # a checkpoint with another config than the store was built from
    other = tmp_path / "other_ckpt"
    shutil.copytree(tiny_checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "min_pixels": 1234}))
    assert head_eval.main(eval_args(clean, tmp_path / "e.json", "--checkpoint", str(other))) == 2
    err = capsys.readouterr().err
    assert "is not the checkpoint" in err and "config_sha256 '" in err and "--allow-store-mismatch" in err
    assert head_train.main(args(clean, tmp_path / "t", "--checkpoint", str(other))) == 2
    assert "config_sha256" in capsys.readouterr().err and not (tmp_path / "t").exists()

    # a head trained on this store, evaluated on a store built with another processor and prefix mode
    run = tmp_path / "run"
    assert head_train.main(args(clean, run, "--val-every", "0", "--steps", "2")) == 0
    rollout = tmp_path / "rollout"
    shutil.copytree(clean, rollout)
    _edit_provenance(rollout, processor="other-processor", prefix_mode="rollout")
    head = str(run / "head.safetensors")
    assert head_eval.main(eval_args(rollout, tmp_path / "f.json", "--head", head)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained on a store built otherwise" in err
    assert "prefix_mode 'teacher' vs 'rollout'" in err and "processor 'tiny' vs 'other-processor'" in err
    assert head_eval.main(eval_args(rollout, tmp_path / "f.json", "--head", head, "--allow-store-mismatch")) == 0
    assert "note: --allow-store-mismatch" in capsys.readouterr().err
    assert head_eval.main(eval_args(clean, tmp_path / "g.json", "--head", head)) == 0  # its own store: fine

    # a head of another expert shape
    state, meta = load_head_file(head)
    hc = AlpamayoCheckpoint.open(tiny_checkpoint).head_config().to_dict()
    hc["expert"] = {**hc["expert"], "intermediate_size": 64}
    save_head(state, tmp_path / "wide.safetensors", {**meta, "head_config": hc})
    for main, argv in ((head_eval.main, eval_args(clean, tmp_path / "h.json", "--head", str(tmp_path / "wide.safetensors"))),
                       (head_train.main, args(clean, tmp_path / "u", "--init-head", str(tmp_path / "wide.safetensors")))):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "a head of another architecture" in err and "expert.intermediate_size 64 vs 96" in err


def test_a_plan_larger_than_host_ram_is_refused_before_loading(clean, tiny_checkpoint, tmp_path, monkeypatch,
                                                               capsys):
    st = Store.open(str(clean))
    head_cfg = AlpamayoCheckpoint.open(tiny_checkpoint).head_config()
    before = head_cfg.hash()
    plan = data.train_ram_plan(head_train.TrainConfig(cache="c", out="o"), st, [0, 1], head_cfg,
                               torch.device("cpu"), torch.float32)
    assert head_cfg.hash() == before  # counted on a copy: building a head changes its config's hash
    assert plan["checkpoint copy"] > 0 and plan["training on the CPU"] > plan["checkpoint copy"]
    plan = data.loader_ram_plan(st, list(range(len(st))), 2, 1, 0, 2e9, 4)
    per = data.stored_bytes(st.manifest(0))
    assert per == 2 * 2 * 2 * st.manifest(0)["prefix_len"] * 16 * 4  # (layers, 2, heads, L, dim) float32
    assert plan["RAM tier"] == sum(data.stored_bytes(st.manifest(i)) for i in range(len(st)))  # all fit in 2 GB
    assert 0 < data.available_ram() < 1 << 50
    monkeypatch.setattr(data, "available_ram", lambda: 10_000)
    assert head_train.main(args(clean, tmp_path / "t")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs about" in err[0] and "GB of host RAM (RAM tier " in err[0]
    assert "0.00 GB is available; lower --ram-cache-gb" in err[0] and not (tmp_path / "t").exists()
    assert head_eval.main(eval_args(clean, tmp_path / "e.json")) == 2
    assert "GB of host RAM (batch " in capsys.readouterr().err and not (tmp_path / "e.json").exists()
    with pytest.raises(ValueError, match=r"needs about 3.00 GB of host RAM \(a 1.00, b 2.00 GB\) but 2.50 GB"):
        data.check_host_ram({"a": 1e9, "b": 2e9}, "x", available=int(2.5e9))
    data.check_host_ram({"a": 1e9, "b": 1e9}, "x", available=int(2.5e9))


def test_resume_without_the_gpu_budget_flag_is_the_same_run(clean, tmp_path):
    """--gpu-memory-budget is a run-time flag; its estimate builds a head on meta, which used to change
    the head config recorded in config.json, so a resume without the flag was refused."""
    out = tmp_path / "run"
    assert head_train.main(args(clean, out, "--stop-after", "2", "--gpu-memory-budget", "100GiB")) == 0
    assert head_train.main(args(clean, out, "--resume")) == 0


def test_a_store_that_recorded_no_checkpoint_pairs_with_any(tiny_checkpoint):
    """Fields the store did not record pass (a store written by a bench or an older build); recorded ones
    are compared."""
    from types import SimpleNamespace

    from head_trainer.integrity import check_store_checkpoint

    ckpt = AlpamayoCheckpoint(tiny_checkpoint)
    for recorded in (None, {}, {"path": "elsewhere", "config_sha256": None}):
        check_store_checkpoint(SimpleNamespace(provenance={"checkpoint": recorded}, url="s"), ckpt)
    wrong = {"config_sha256": "0" * 64, "head_config_hash": ckpt.identity()["head_config_hash"]}
    with pytest.raises(ValueError, match=r"config_sha256 '0000.*' vs '[0-9a-f]{64}'"):
        check_store_checkpoint(SimpleNamespace(provenance={"checkpoint": wrong}, url="s"), ckpt)


@pytest.fixture(scope="module")
def bad_manifest(clean, tmp_path_factory):
    """A copy of the clean store with one training sample's manifest cut short (not JSON)."""
    path = tmp_path_factory.mktemp("bad_manifest") / "store"
    shutil.copytree(clean, path)
    st = Store.open(str(path))
    key = next(k for k in st.keys() if st.manifest(k)["split"] == "train")
    m = st.manifest(key)
    for snap in (path / "index").glob("*.json"):  # else open() takes the snapshot's intact copy of it
        snap.unlink()
    commit = path / "commits" / m["writer_id"] / f"{m['sid']}.json"
    commit.write_text(commit.read_text()[:40])
    return path, key, f"manifest {m['writer_id']}/{m['sid']}"


def test_skip_bad_samples_with_a_damaged_manifest(bad_manifest, tmp_path, capsys):
    store, key, name = bad_manifest
    assert head_train.main(args(store, tmp_path / "refused")) == 2  # the default: refused, naming it
    err = capsys.readouterr().err
    assert "head-train: error: 1 damaged manifest(s)" in err and f"(sample {key!r}): not JSON" in err
    out = tmp_path / "run"
    assert head_train.main(args(store, out, "--skip-bad-samples")) == 0
    skipped = json.loads((out / "summary.json").read_text())["skipped_samples"]
    assert list(skipped) == [name] and skipped[name].startswith("not JSON")
    assert f"head-train: skipped 1 damaged samples (--skip-bad-samples): {name}: not JSON" in capsys.readouterr().err
    assert head_eval.main(eval_args(store, tmp_path / "refused.json")) == 2
    assert "damaged manifest" in capsys.readouterr().err and not (tmp_path / "refused.json").exists()
    assert head_eval.main(eval_args(store, tmp_path / "e.json", "--skip-bad-samples")) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert list(res["skipped_samples"]) == [name] and key not in {r["key"] for r in res["per_sample"]}
    assert len(res["per_sample"]) == len(Store.open(str(store), skip_damaged=True)) == 11


def stop_lines(err: str) -> list[str]:
    """The lines head-train printed about a stop or an error (tqdm's bar lines aside)."""
    return [x for x in err.replace("\r", "\n").splitlines() if x.startswith(("head-train: stopped", "head-train: error"))]


def test_damaged_samples_with_dataloader_workers(damaged, tmp_path, capsys):
    """--num-workers 2: the damaged sample is read in a worker process; torch re-raises a worker's exception
    with the worker's traceback in its message. The stop must read as with workers 0: one line naming the
    sample, exit 1, the run directory resumable, and --skip-bad-samples the same run as in-process."""
    store, train_key, val_key = damaged
    w2 = ("--num-workers", "2")
    for ram in ("0", "2"):  # read by the loader's workers / by the tier fill's workers
        assert head_train.main(args(store, tmp_path / f"refused{ram}", *w2, "--ram-cache-gb", ram)) == 1
        err = capsys.readouterr().err
        lines = stop_lines(err)
        assert len(lines) == 1 and "Traceback" not in err and "worker" not in err, err[-2000:]
        assert f"sample {train_key!r}" in lines[0] and "checksum mismatch" in lines[0]
        assert "the run directory is intact: --resume" in lines[0] and lines[0].endswith("add --skip-bad-samples "
                                                                                          "to leave damaged samples out")
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"skip{workers}"
        assert head_train.main(args(store, out, "--skip-bad-samples", "--ram-cache-gb", "0",
                                    "--num-workers", workers)) == 0
        assert set(json.loads((out / "summary.json").read_text())["skipped_samples"]) == {train_key, val_key}
        runs[workers] = load_head_file(out / "head.safetensors")[0]
    assert all(torch.equal(runs["0"][k], runs["2"][k]) for k in runs["0"])
    capsys.readouterr()
    # stopped on the sample (seed 2: in step 4, after the step-2 checkpoint) with the very line of workers 0,
    # then resumed with workers and the flag: the same run as skipping throughout
    cut, once = tmp_path / "cut", ("--ram-cache-gb", "0", "--val-every", "0", "--seed", "2", *w2)
    assert head_train.main(args(store, tmp_path / "cut0", *once[:-2])) == 1
    want = stop_lines(capsys.readouterr().err)
    assert head_train.main(args(store, cut, *once)) == 1
    lines = stop_lines(capsys.readouterr().err)
    assert lines == want and len(lines) == 1 and f"sample {train_key!r}" in lines[0]
    assert "--resume (from step 2)" in lines[0] and (cut / "checkpoints/step_0000002").is_dir()
    assert head_train.main(args(store, tmp_path / "ref", *once[:-2], "--skip-bad-samples")) == 0
    assert head_train.main(args(store, cut, *once, "--resume", "--skip-bad-samples")) == 0
    a, b = load_head_file(tmp_path / "ref/head.safetensors")[0], load_head_file(cut / "head.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
