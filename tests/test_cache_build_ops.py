"""cache-build modes and operations: rollout cut, given-cot sources, SIGKILL + resume, concurrent shards."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import cache_builder.rollout as rollout
from cache_builder.cache_build import BuildConfig, build
from cache_builder.vlm import load_vlm, prefill
from shared.checkpoint import AlpamayoCheckpoint
from shared.data import corrupt_clip, open_dataset, write_synthetic_world
from shared.prompt import MaskTrajTokens
from shared.qwen_files import alpamayo_token_ids, load_processor
from shared.store import Store


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops_world")
    write_synthetic_world(root, n_clips=4, seed=5, width=160, height=96, duration_s=12.0,
                          kinds=["sharp-left", "straight", "sharp-right", "gentle-left"])
    return root


def _cfg(world, ckpt, out, **kw):
    return BuildConfig(dataset=str(world), checkpoint=str(ckpt), out=str(out), kv_dtype="float32",
                       cameras="front-only", keyframes="stride:2", batch_size=1, **kw)


class ForceStopAfter3(MaskTrajTokens):
    """Still masks <iN>; after 3 sampled tokens (one call per step) only <|traj_future_start|> may follow."""

    stop_id: int

    def __call__(self, input_ids, scores):
        scores = super().__call__(input_ids, scores)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > 3:
            keep = scores[:, self.stop_id].clone()
            scores[:] = float("-inf")
            scores[:, self.stop_id] = keep
        if self.calls == 5:  # the step after <|traj_future_start|>: the batch is over (batch_size=1)
            self.calls = 0
        return scores


def _spy_on_generation(monkeypatch) -> dict:
    """Wrap rollout.generate_prefixes: records the prompt length and which rows kept the generation's cache."""
    seen = {}
    orig = rollout.generate_prefixes

    def spy(vlm, processor, keys, inputs, seed, max_new_tokens=256, keep_hidden=True, decoder=None):
        seen["prompt_len"] = inputs[0]["input_ids"].shape[1]
        seen["decoder"] = decoder
        out = orig(vlm, processor, keys, inputs, seed, max_new_tokens, keep_hidden, decoder)
        seen["from_generation"] = [prefix is not None for _, _, prefix in out]
        return out

    monkeypatch.setattr(rollout, "generate_prefixes", spy)
    return seen


def test_rollout_prefix_is_cut_after_traj_future_start(world, tiny_checkpoint, tmp_path, monkeypatch):
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    ids = alpamayo_token_ids(load_processor(str(ck.vlm_base)).tokenizer)
    first = _spy_on_generation(monkeypatch)

    class Proc(ForceStopAfter3):
        def __init__(self, traj_start):
            super().__init__(traj_start)
            self.stop_id = ids["traj_future_start"]

    monkeypatch.setattr(rollout, "MaskTrajTokens", Proc)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    build(_cfg(world, tiny_checkpoint, out_a, mode="rollout", max_samples=2, seed=7))
    build(_cfg(world, tiny_checkpoint, out_b, mode="rollout", max_samples=2, seed=7))
    a, b = Store.open(str(out_a)), Store.open(str(out_b))
    assert a.provenance["prefix_mode"] == "rollout" and len(a) == 2
    for i in range(2):
        ra, rb = a.read(i), b.read(i)
        assert ra.reasoning == rb.reasoning  # seeded
        toks = ra.token_ids
        P = first["prompt_len"]
        assert ra.prefix_len == P + 4 and int(toks[-1]) == ids["traj_future_start"]
        assert int(toks[P - 1]) == ids["cot_start"]
        gen = toks[P:]
        assert not ((gen >= ids["traj_start"]) & (gen < ids["traj_end"])).any()  # <iN> never sampled
        # the stored KV is exactly the prefill of the stored prefix
        vlm = load_vlm(AlpamayoCheckpoint.open(tiny_checkpoint), torch.float32)
        proc = load_processor(str(AlpamayoCheckpoint.open(tiny_checkpoint).vlm_base))
        from shared.data import load_sample
        from shared.prompt import build_vlm_inputs

        clip, rest = ra.key.split("@")
        s = load_sample(open_dataset(world), clip, int(rest.split(":")[0]), "front-only")
        x = build_vlm_inputs(proc, s, mode="rollout")
        x["input_ids"] = toks[None]
        x["attention_mask"] = torch.ones_like(x["input_ids"])
        x["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"][0], torch.zeros(4, dtype=torch.long)])[None]
        # the stored K/V/hidden are the generation's own (prompt prefill + 3 decode steps, no second
        # prefill), equal to a fresh prefill of the stored prefix up to incremental-decode rounding
        assert first["from_generation"] == [True] and first["decoder"] is not None  # the static-cache decoder
        pf = prefill(vlm, x, ra.prefix_len)
        torch.testing.assert_close(ra.k, pf.keys[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ra.v, pf.values[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ra.hidden, pf.hidden[0], rtol=1e-5, atol=1e-5)
        assert not torch.equal(ra.k[:, :, P:], torch.zeros_like(ra.k[:, :, P:]))
        assert ra.rope_delta == int(pf.rope_deltas[0])


def test_rollout_row_not_wholly_in_the_generation_cache_is_prefilled(world, tiny_checkpoint, tmp_path, monkeypatch):
    """No <|traj_future_start|> within max_new_tokens: the prefix is the whole sequence, whose last
    token was never forwarded, so that row falls back to a prefill of exactly that prefix."""
    ck = AlpamayoCheckpoint.open(tiny_checkpoint)
    ids = alpamayo_token_ids(load_processor(str(ck.vlm_base)).tokenizer)
    seen = _spy_on_generation(monkeypatch)

    class NeverStop(MaskTrajTokens):
        def __call__(self, input_ids, scores):
            scores = super().__call__(input_ids, scores)
            scores[:, [ids["traj_future_start"], ids["im_end"]]] = float("-inf")
            return scores

    monkeypatch.setattr(rollout, "MaskTrajTokens", NeverStop)
    out = tmp_path / "s"
    build(_cfg(world, tiny_checkpoint, out, mode="rollout", max_samples=1, max_new_tokens=2))
    assert seen["from_generation"] == [False]
    rec = Store.open(str(out)).read(0)
    assert rec.prefix_len == seen["prompt_len"] + 2
    from shared.data import load_sample
    from shared.prompt import build_vlm_inputs

    clip, rest = rec.key.split("@")
    x = build_vlm_inputs(load_processor(str(ck.vlm_base)), load_sample(open_dataset(world), clip,
                         int(rest.split(":")[0]), "front-only"), mode="rollout")
    x["input_ids"] = rec.token_ids[None]
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    x["mm_token_type_ids"] = torch.cat([x["mm_token_type_ids"][0], torch.zeros(2, dtype=torch.long)])[None]
    pf = prefill(load_vlm(ck, torch.float32), x, rec.prefix_len)
    assert torch.equal(pf.keys[:, 0], rec.k) and torch.equal(pf.hidden[0], rec.hidden)


def test_given_cot_from_dataset_reasoning_and_from_a_file(world, tiny_checkpoint, tmp_path):
    ds = open_dataset(world)
    clips = ds.clip_ids()
    with pytest.raises(ValueError, match="--cot-file"):
        build(_cfg(world, tiny_checkpoint, tmp_path / "none", mode="given-cot"))
    (world / "reasoning").mkdir(exist_ok=True)
    events = {c: json.dumps([{"event_start_timestamp": 3_000_000, "cot": f"Curve ahead in {c[:4]}, slow down."}])
              for c in clips[:2]}
    pd.DataFrame({"events": events}).rename_axis("clip_id").to_parquet(world / "reasoning/ood_reasoning.parquet")
    summary = build(_cfg(world, tiny_checkpoint, tmp_path / "ds", mode="given-cot"))
    st = Store.open(str(tmp_path / "ds"))
    assert summary["written"] == len(st) >= 1 and summary["skipped_no_reasoning"] > 0
    for i in range(len(st)):
        m = st.manifest(i)
        assert m["reasoning"] == f"Curve ahead in {m['clip_id'][:4]}, slow down."
        assert abs(m["t0_us"] - 3_000_000) <= 1_000_000
    cot_file = tmp_path / "cot.json"
    cot_file.write_text(json.dumps({clips[3]: "Straight road, keep lane."}))
    build(_cfg(world, tiny_checkpoint, tmp_path / "file", mode="given-cot", cot_file=str(cot_file)))
    st = Store.open(str(tmp_path / "file"))
    assert len(st) >= 1 and {st.manifest(i)["clip_id"] for i in range(len(st))} == {clips[3]}
    rec = st.read(0)
    tok = load_processor(str(AlpamayoCheckpoint.open(tiny_checkpoint).vlm_base)).tokenizer
    assert "<|cot_start|>Straight road, keep lane.<|cot_end|><|traj_future_start|>" in tok.decode(rec.token_ids)


def _cli(world, ckpt, out, *extra):
    return [sys.executable, "-m", "cache_builder.cache_build", "--dataset", str(world), "--checkpoint", str(ckpt),
            "--out", str(out), "--kv-dtype", "float32", "--cameras", "front-only", "--keyframes", "stride:2",
            "--batch-size", "1", *extra]


def _assert_same_samples(a: Store, b: Store):
    assert a.keys() == b.keys()
    for key in a.keys():
        ra, rb = a.read(key), b.read(key)
        assert torch.equal(ra.k, rb.k) and torch.equal(ra.v, rb.v) and torch.equal(ra.hidden, rb.hidden), key
        assert (ra.gt_action == rb.gt_action).all() and ra.rope_delta == rb.rope_delta


def test_sigkill_resume_and_concurrent_shards_equal_an_uninterrupted_build(world, tiny_checkpoint, tmp_path):
    ref_url = tmp_path / "ref"
    build(_cfg(world, tiny_checkpoint, ref_url))
    ref = Store.open(str(ref_url))
    assert len(ref) >= 8
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # 1) kill -9 while a writer process holds a fully written sample just before its commit, then resume
    killed, marker = tmp_path / "killed", tmp_path / "marker"
    proc = subprocess.Popen(_cli(world, tiny_checkpoint, killed, "--writer-processes", "2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**env, "ALPAMAYO_FAILPOINTS": "before_commit=hold@2",
                                 "ALPAMAYO_FAILPOINTS_MARKER": str(marker)})
    deadline = time.time() + 300
    while not (marker.exists() and marker.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    held = json.loads(marker.read_text().splitlines()[0])
    torn = killed / "samples" / held["sid"]
    assert any(torn.glob("kv/c.*")) and not list((killed / "commits").glob(f"*/{held['sid']}.json"))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(Store.open(str(killed)))
    assert 1 <= partial < len(ref), "the kill should land mid-build"
    assert Store.open(str(killed)).verify().warnings  # the held sample is an orphan
    summary = build(_cfg(world, tiny_checkpoint, killed, resume=True))
    assert summary["already_done"] == partial and summary["written"] == len(ref) - partial
    resumed = Store.open(str(killed))
    assert resumed.verify().ok and not resumed.verify().warnings and held["key"] in resumed
    _assert_same_samples(ref, resumed)
    # 2) two processes, disjoint shards, one store
    shared_url = tmp_path / "sharded"
    build(_cfg(world, tiny_checkpoint, shared_url, max_samples=0))  # create the store once (no samples)
    procs = [subprocess.Popen(_cli(world, tiny_checkpoint, shared_url, "--resume", "--shard", f"{i}/2"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    sharded = Store.open(str(shared_url))
    report = sharded.verify()
    assert report.ok, report
    _assert_same_samples(ref, sharded)


def test_cpu_stage_in_worker_processes_equals_inline(world, tiny_checkpoint, tmp_path):
    """Inputs, GT and thumbnails built in 2 DataLoader processes, written by 2 writer processes, give the
    same store as inline with one writer thread, bit for bit, and the clips a worker could not read are
    reported (merged over workers), not lost."""
    import shutil

    broken = tmp_path / "world"
    shutil.copytree(world, broken)
    bad = open_dataset(broken).clip_ids()[1]
    corrupt_clip(broken, bad, "missing-camera-member")
    inline = build(_cfg(broken, tiny_checkpoint, tmp_path / "inline", workers=0, writer_threads=1))
    procs = build(_cfg(broken, tiny_checkpoint, tmp_path / "procs", workers=2, writer_processes=2))
    assert procs["cpu_workers"] == 2 and inline["cpu_workers"] == 0 and procs["writer_processes"] == 2
    assert set(procs["gpu_stage_waited"]) == {"inputs_s", "writer_s"}  # where the GPU stage stood still
    assert all(v >= 0 for v in procs["gpu_stage_waited"].values())
    assert inline["skipped_clips"] == procs["skipped_clips"] == {"missing-member": 1}
    assert inline["written"] == procs["written"] >= 4
    a, b = Store.open(str(tmp_path / "inline")), Store.open(str(tmp_path / "procs"))
    assert bad not in {a.manifest(k)["clip_id"] for k in a.keys()}
    _assert_same_samples(a, b)
    for key in a.keys():
        assert (a.read_small(key)["thumbs"] == b.read_small(key)["thumbs"]).all()
    assert b.verify().ok


def test_worker_counts_are_validated_before_any_model_loads(world, tmp_path):
    with pytest.raises(ValueError, match="--workers -1"):
        build(_cfg(world, tmp_path / "no-checkpoint", tmp_path / "s", workers=-1))
    with pytest.raises(ValueError, match="--writer-threads 0"):
        build(_cfg(world, tmp_path / "no-checkpoint", tmp_path / "s", writer_threads=0))
    with pytest.raises(ValueError, match="--writer-processes -1"):
        build(_cfg(world, tmp_path / "no-checkpoint", tmp_path / "s", writer_processes=-1))
