"""The head-train loop on the tiny checkpoint: what each trainable mode changes, official names out,
validation determinism, run-directory lock, resume refusal, data integrity, kill + resume bitwise."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from train_store import write_train_store

from head_trainer import adam8, data, head_export, head_train
from head_trainer.data import collate, sample_item
from head_trainer.metrics import trajectory_metrics
from head_trainer.run_dir import RunLock
from head_trainer.validation import Validator
from shared.checkpoint import AlpamayoCheckpoint, head_from_state, load_head_file
from shared.fast_expert import resolve_attention
from shared.store import Store, StoreError, sample_id


@pytest.fixture(scope="module")
def store(tiny_checkpoint, tmp_path_factory):
    return write_train_store(tmp_path_factory.mktemp("train") / "store", tiny_checkpoint)


def _args(store, out, *extra, tensorboard=False):
    return ["--cache", str(store), "--out", str(out), "--steps", "4", "--batch-size", "2", "--warmup-steps", "1",
            "--save-every", "2", "--log-every", "1", "--val-every", "0", *extra,
            *([] if tensorboard else ["--no-tensorboard"])]


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _read_fails_at(n):
    """data.read_raw raising a StoreError naming the key at the n-th read (what a CRC mismatch raises)."""
    orig, calls = data.read_raw, [0]

    def read(store, i):
        calls[0] += 1
        if calls[0] == n:
            raise StoreError(f"{store.manifest(i)['key']}: kv crc32 mismatch")
        return orig(store, i)

    return read


@pytest.mark.parametrize("mode, extra", [
    ("all", ["--dtype", "bfloat16"]),
    ("all", ["--dtype", "bfloat16", "--optimizer", "adamw-sr"]),  # stochastic rounding: the RNG state resumes
    ("all", ["--dtype", "bfloat16", "--optimizer", "adamw8bit-fused"]),  # 8-bit states + the folded clip resume
    ("projections", []),
    ("lora", ["--lora-rank", "4", "--lora-alpha", "8", "--ema-decay", "0.9"]),
    ("all", ["--dtype", "bfloat16", "--attention", "split"]),  # the prefix read in place (shared/prefix_attention.py)
])
def test_kill_resume_bitwise_and_what_each_mode_trains(store, tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                                       mode, extra):
    args = ["--trainable", mode, "--steps", "5", "--ram-cache-gb", "0", *extra]
    # the tiny head's tensors are all under 4096 elements: quantise from 1024 so 8-bit states are resumed too
    small_blocks = (lambda: monkeypatch.setattr(adam8, "MIN_QUANTISED", 1024)) if "adamw8bit-fused" in extra else (lambda: None)
    small_blocks()
    assert head_train.main(_args(store, tmp_path / "full", *args)) == 0
    # the 9th sample read (step 5, read one step ahead) fails: metrics hold step 3, the last checkpoint is step 2
    monkeypatch.setattr(data, "read_raw", _read_fails_at(9))
    assert head_train.main(_args(store, tmp_path / "cut", *args)) == 1
    err = capsys.readouterr().err
    assert "before step 4:" in err and "kv crc32 mismatch" in err and "--resume (from step 2)" in err
    assert _steps(tmp_path / "cut") == [1, 2, 3]
    monkeypatch.undo()
    small_blocks()
    assert head_train.main(_args(store, tmp_path / "cut", "--resume", *args)) == 0
    assert _steps(tmp_path / "cut") == [1, 2, 3, 4, 5]  # step 3 once, not twice
    stems = ["head"] + (["ema_head"] if "--ema-decay" in extra else [])
    base = AlpamayoCheckpoint.open(tiny_checkpoint).head_state_dict()
    for stem in stems:
        a, meta = load_head_file(tmp_path / f"full/{stem}.safetensors")
        b, _ = load_head_file(tmp_path / f"cut/{stem}.safetensors")
        assert set(a) == set(base)  # official names only (LoRA merged)
        assert all(torch.equal(a[k], b[k]) for k in a), stem
    want = torch.bfloat16 if mode == "all" else torch.float32
    assert a["expert.layers.0.mlp.up_proj.weight"].dtype == want
    changed = {k for k in base if not torch.equal(a[k].to(base[k].dtype), base[k])}
    proj = {k for k in base if k.startswith(("action_in_proj.", "action_out_proj.")) and not k.endswith("freqs")}
    if mode == "projections":
        assert changed == proj
    elif mode == "lora":
        assert proj <= changed and "expert.layers.0.self_attn.q_proj.weight" in changed
        assert not any(k.startswith("expert.") and "_proj." not in k for k in changed)  # norms untouched
    else:
        assert "expert.layers.0.self_attn.q_proj.weight" in changed and "expert.norm.weight" in changed
    assert not any(k.startswith("action_space.") for k in changed)
    if "adamw8bit-fused" in extra:  # the resumed optimizer held 8-bit codes
        from safetensors import safe_open

        state = max((tmp_path / "cut" / "checkpoints").glob("*/optimizer.safetensors"))
        with safe_open(str(state), "pt") as f:
            assert any(k.endswith(".m_codes") for k in f.keys())
    if mode == "lora":
        assert head_export.main(["--head", str(tmp_path / "cut/head.safetensors"), "--out", str(tmp_path / "x")]) == 0
        exported = AlpamayoCheckpoint.open(tmp_path / "x").head_state_dict()
        assert set(exported) == set(base)


def test_val_loss_is_the_same_number_twice(store, tiny_checkpoint):
    ckpt = AlpamayoCheckpoint.open(tiny_checkpoint)
    st = Store.open(str(store))
    val = [i for i in range(len(st)) if st.manifest(i)["split"] == "val"]
    head = head_from_state(ckpt.head_config(), ckpt.head_state_dict()).train()
    a = Validator(st, val, 2, 3, 0, torch.device("cpu")).loss(head)
    assert a == Validator(st, val, 2, 3, 0, torch.device("cpu")).loss(head) and head.training
    # the draws belong to the sample, not to the batch it lands in
    assert a == pytest.approx(Validator(st, val[::-1], 1, 3, 0, torch.device("cpu")).loss(head), rel=1e-6)
    assert Validator(st, val, 2, 1, 0, torch.device("cpu")).loss(head) != a
    # quick minADE through the fast expert == the head's own sampler with the same noise
    got = Validator(st, val, 2, 1, 3, torch.device("cpu")).min_ade(head, num_samples=4, seed=7)
    gen, ref = torch.Generator().manual_seed(7), []
    for chunk in (val[:2], val[2:3]):
        b = collate([sample_item(st.read(i, with_hidden=False)) for i in chunk])
        pred = head.sample_trajectories(b.prefix, b.hist_xyz, b.hist_rot, 4, generator=gen)
        ref.append(trajectory_metrics(pred, b.fut_xyz)["min_ade"])
    # velocities agree to ~2e-7; the random tiny head amplifies that through 10 Euler steps (~0.1 % here)
    assert got == pytest.approx(float(torch.cat(ref).mean()), rel=1e-2)


def test_validation_best_k_and_logs(store, tmp_path):
    out = tmp_path / "run"
    assert head_train.main(_args(store, out, "--val-every", "2", "--keep-best", "1", "--val-ade-items", "1",
                                 tensorboard=True)) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert set(vals) == {2, 4} and all(r["val_min_ade"] > 0 for r in recs if "val_loss" in r)
    index = json.loads((out / "best/index.json").read_text())
    best_step = min(vals, key=vals.get)
    assert index == [{"step": best_step, "val_loss": vals[best_step]}]
    assert [p.name for p in (out / "best").iterdir() if p.is_dir()] == [f"step_{best_step:07d}"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["samples"]) == (4, 8) and summary["bound"] in ("loader", "step")
    # 4 steps: the first (4 // 4 = 1) is warm-up, the other 3 are the steady state
    assert summary["steady_steps"] == 3 and summary["steady_ms_per_sample"] > 0
    assert summary["steady_samples_per_s"] == pytest.approx(1e3 / summary["steady_ms_per_sample"], rel=0.01)


def test_lock_refuses_a_second_run_and_recovers_a_dead_one(store, tmp_path, capsys):
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    assert head_train.main(_args(store, out)) == 2
    assert f"in use by pid {os.getpid()} on {socket.gethostname()}" in capsys.readouterr().err
    lock.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "start": None}))
    assert head_train.main(_args(store, out, "--steps", "2")) == 0  # the dead holder's lock is taken over
    assert not (out / ".lock").exists()


def test_resume_refuses_config_changes_and_bad_warmup(store, tmp_path, capsys):
    out = tmp_path / "run"
    assert head_train.main(_args(store, out, "--stop-after", "2")) == 0
    before = (out / "config.json").read_text()
    assert head_train.main(_args(store, out, "--resume", "--lr", "2e-4", "--batch-size", "3")) == 2
    err = capsys.readouterr().err
    assert "lr: 0.0001 -> 0.0002" in err and "batch_size: 2 -> 3" in err and "--allow-config-change" in err
    assert (out / "config.json").read_text() == before
    assert head_train.main(_args(store, out, "--resume", "--num-workers", "0", "--log-every", "2")) == 0  # harmless
    assert head_train.main(_args(store, tmp_path / "w", "--warmup-steps", "5")) == 2
    assert "--warmup-steps 5 is not shorter than the run" in capsys.readouterr().err
    assert head_train.main(_args(store, tmp_path / "m", "--gpu-memory-budget", "1MiB")) == 2  # before any model
    assert "of --gpu-memory-budget" in capsys.readouterr().err and not (tmp_path / "m").exists()
    assert head_train.main(_args(store, tmp_path / "a", "--attention", "flash")) == 2
    assert "--attention 'flash': use one of auto, sdpa, split" in capsys.readouterr().err and not (tmp_path / "a").exists()


def _two_runs(store, tmp_path, common: list[str], flag: list[str]) -> dict:
    """head-train without and with `flag` -> {"plain" / "with": (logged losses, final head state)}."""
    runs = {}
    for name, extra in (("plain", []), ("with", flag)):
        out = tmp_path / name
        assert head_train.main(_args(store, out, *common, *extra)) == 0
        runs[name] = ([json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()],
                      load_head_file(out / "head.safetensors")[0])
    return runs


def test_int8_prefix_trains_what_the_dequantised_slots_train(store, tiny_checkpoint, tmp_path, capsys):
    """--int8-prefix: the slots hold the int8 codes and scales and the split attention dequantises them as
    the feeder would (codes x scale in fp32), so an fp32 run's losses and weights are bitwise those of the
    same run from dequantised slots. Refused without the split attention or on a store that is not int8."""
    q8 = write_train_store(tmp_path / "q8", tiny_checkpoint, n=8, quant="int8")
    runs = _two_runs(q8, tmp_path, ["--attention", "split"], ["--int8-prefix"])
    assert runs["plain"][0] == runs["with"][0]
    assert all(torch.equal(v, runs["with"][1][k]) for k, v in runs["plain"][1].items())
    capsys.readouterr()
    assert head_train.main(_args(q8, tmp_path / "r1", "--int8-prefix", "--attention", "sdpa")) == 2
    assert "--int8-prefix is read by --attention split" in capsys.readouterr().err
    assert head_train.main(_args(q8, tmp_path / "r2", "--int8-prefix")) == 2  # auto: SDPA on the CPU
    assert "--int8-prefix needs the split attention" in capsys.readouterr().err
    assert head_train.main(_args(store, tmp_path / "r3", "--int8-prefix", "--attention", "split")) == 2
    err = capsys.readouterr().err
    assert "--int8-prefix reads int8 stores" in err and "holds 'none' K/V" in err
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def test_fused_wgrad_run_trains_as_the_plain_run(store, tmp_path, capsys):
    """head-train --fused-wgrad (the expert's weight GEMMs fill the gradient buffers): the same losses and head
    as without, to fp32 rounding; refused where the expert's weights do not train."""
    runs = _two_runs(store, tmp_path, ["--grad-accum", "2"], ["--fused-wgrad"])
    assert runs["with"][0] == pytest.approx(runs["plain"][0], rel=1e-5)
    for k, v in runs["plain"][1].items():
        torch.testing.assert_close(runs["with"][1][k], v, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert head_train.main(_args(store, tmp_path / "p", "--fused-wgrad", "--trainable", "projections")) == 2
    assert "--fused-wgrad fills the expert's weight gradients; --trainable projections" in capsys.readouterr().err


def test_nan_in_a_batch_stops_with_the_sample_key(tiny_checkpoint, tmp_path, capsys):
    def poison(s):
        s.k[0, 0, 0, 0] = float("nan")

    st_path = write_train_store(tmp_path / "bad", tiny_checkpoint, n=6, bad={1: poison})
    bad_key = Store.open(str(st_path)).manifest(1)["key"]
    out = tmp_path / "run"
    assert head_train.main(_args(st_path, out, "--split", "all", "--save-every", "1", "--steps", "6")) == 1
    err = capsys.readouterr().err
    assert f"sample {bad_key!r} holds NaN/Inf" in err
    for ck in (out / "checkpoints").glob("step_*"):  # nothing saved after the bad batch
        state, _ = load_head_file(ck / "head.safetensors")
        assert all(torch.isfinite(v).all() for v in state.values())


def test_presets_fill_only_what_the_command_line_leaves_open():
    from head_trainer.presets import PRESETS, apply_preset

    argv = ["--cache", "c", "--out", "o", "--preset", "debug", "--steps", "7", "--batch-size", "4"]
    cfg = head_train.TrainConfig(**apply_preset(vars(_parse(argv)), head_train.explicit_flags(argv)))
    assert (cfg.steps, cfg.batch_size) == (7, 4)  # given explicitly, even when equal to a default
    assert cfg.device == PRESETS["debug"]["device"] and cfg.val_every == PRESETS["debug"]["val_every"]
    assert head_train.explicit_flags(["--cache", "c", "--out", "o", "--no-tensorboard"]) == {"cache", "out",
                                                                                              "tensorboard"}
    for flags, want in (([], True), (["--no-gradient-checkpointing"], False)):  # a preset's choice can be undone
        argv = ["--cache", "c", "--out", "o", "--preset", "24gb", *flags]
        cfg = head_train.TrainConfig(**apply_preset(vars(_parse(argv)), head_train.explicit_flags(argv)))
        assert cfg.gradient_checkpointing is want and cfg.attention == "auto"
    assert [resolve_attention(a, d) for a, d in (("auto", "cuda"), ("auto", "cpu"), ("sdpa", "cuda"))] == [
        "split", "sdpa", "sdpa"]
    assert _parse(["--cache", "c", "--out", "o"]).gradient_checkpointing is False
    assert _parse(["--cache", "c", "--out", "o", "--tensorboard"]).tensorboard is True
    with pytest.raises(ValueError, match="--preset 'big'"):
        apply_preset({"preset": "big"}, set())
    for values in PRESETS.values():  # every preset is a valid config
        head_train.TrainConfig(cache="c", out="o", **{**values, "steps": max(values.get("steps", 300), 3)}).validate()


def _parse(argv):
    from shared.cli import parser_for

    return parser_for(head_train.TrainConfig, "head-train", "", ("cache", "out")).parse_args(argv)


def test_a_crc_mismatch_stops_with_the_sample_key(tiny_checkpoint, tmp_path, capsys):
    st_path = write_train_store(tmp_path / "crc", tiny_checkpoint, n=6, codec="none")
    st = Store.open(str(st_path))
    key = next(k for k in st.keys() if st.manifest(k)["split"] == "train")
    chunk = sorted((st_path / "samples" / sample_id(key) / "kv").glob("c*"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size: only the crc32 sees it
    chunk.write_bytes(bytes(raw))
    assert head_train.main(_args(st_path, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert f"sample {key!r}" in err and "checksum mismatch" in err and "--resume (from step 0)" in err
