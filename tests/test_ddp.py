"""Data parallel: 2 CPU processes (gloo, launched as `accelerate launch` / torchrun would) at per-device
batch 2 equal 1 process at batch 4 and 1 process at batch 2 x --grad-accum 2 (fp32, 1e-6)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from train_store import write_train_store

from head_trainer import head_train
from shared.checkpoint import AlpamayoCheckpoint, load_head_file

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_at_the_same_global_batch(tiny_checkpoint, tmp_path):
    store = write_train_store(tmp_path / "store", tiny_checkpoint, n=12)
    common = ["--cache", str(store), "--steps", "3", "--warmup-steps", "1", "--log-every", "1", "--val-every", "0",
              "--no-tensorboard", "--dtype", "float32", "--device", "cpu", "--seed", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "head_trainer.head_train", *common, "--out", str(tmp_path / "ddp"), "--batch-size", "2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert head_train.main([*common, "--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    assert head_train.main([*common, "--out", str(tmp_path / "accum"), "--batch-size", "2", "--grad-accum", "2"]) == 0
    one, _ = load_head_file(tmp_path / "one/head.safetensors")
    for run in ("ddp", "accum"):
        other, _ = load_head_file(tmp_path / run / "head.safetensors")
        assert set(other) == set(one)
        worst = max(float((other[k] - one[k]).abs().max()) for k in one)
        assert worst <= 1e-6, (run, worst)
    logs = {run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("ddp", "one")}
    assert [r["step"] for r in logs["ddp"]] == [1, 2, 3]  # rank 0 alone logs
    for a, b in zip(logs["ddp"], logs["one"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(b["loss"]))  # the global batch's loss
    base = AlpamayoCheckpoint.open(tiny_checkpoint).head_state_dict()
    assert not torch.equal(one["expert.layers.0.mlp.up_proj.weight"], base["expert.layers.0.mlp.up_proj.weight"])
