"""head-train stopped at the moments that matter (mid-step, each checkpoint file half-written, before
and after the checkpoint's rename, mid-prune, a best head renamed before its index), then --resume:
the final head, the metrics and the best-k index equal an uninterrupted run bit for bit, and no
half-written checkpoint is loaded. In-process cases stop with the `raise` failpoint (what is on disk
at that moment is the state a kill leaves); one case is a real SIGKILL of a head-train process.
bench/fault_injection.py --train kills at random points."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_store import write_train_store

import shared.failpoints as fp
from head_trainer import head_train, run_dir
from shared.checkpoint import load_head_file

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("samples_per_s",)


@pytest.fixture(scope="module")
def store(tiny_checkpoint, tmp_path_factory):
    return write_train_store(tmp_path_factory.mktemp("train") / "store", tiny_checkpoint)


def args(store, out, *extra):
    return ["--cache", str(store), "--out", str(out), "--steps", "6", "--batch-size", "2", "--warmup-steps", "1",
            "--save-every", "2", "--keep-last", "1", "--log-every", "1", "--val-every", "3", "--keep-best", "1",
            "--val-ade-items", "0", "--ram-cache-gb", "0", "--no-tensorboard", *extra]


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, ref: Path) -> None:
    a, _ = load_head_file(ref / "head.safetensors")
    b, _ = load_head_file(out / "head.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(out) == metrics(ref)
    assert (out / "best/index.json").read_text() == (ref / "best/index.json").read_text()
    assert sorted(p.name for p in (out / "best").iterdir()) == sorted(p.name for p in (ref / "best").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000006"]


@pytest.fixture(scope="module")
def ref(store, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert head_train.main(args(store, out)) == 0
    return out


def stop_at(monkeypatch, point: str, nth: int) -> None:
    monkeypatch.setitem(fp._ACTIVE, point, ("raise", nth))
    monkeypatch.setattr(fp, "_hits", {})


# (point, nth hit, what must be on disk when it stops). Files per checkpoint: head +
# optimizer; checkpoints at steps 2, 4, 6. (The fast subset: bench/fault_injection.py --train draws
# random hits of these and of train_batch, and kills at random times; test_train_loop.py stops mid-run.)
CASES = [
    ("ckpt_file_write", 6, "step_0000004.partial/optimizer.safetensors"),  # the optimizer half-written (head, rng, optimizer per checkpoint)
    ("ckpt_before_rename", 2, "step_0000004.partial/state.json"),
    ("ckpt_after_rename", 2, "step_0000002"),  # both checkpoints whole, the old one not pruned
    ("ckpt_prune", 1, "step_0000002.deleting"),
    ("best_write", 1, "best/step_0000003"),  # renamed, index.json not yet updated
]


@pytest.mark.parametrize("point,nth,torn", CASES, ids=[f"{c[0]}@{c[1]}" for c in CASES])
def test_stopped_at_a_failpoint_resumes_to_the_uninterrupted_run(store, ref, tmp_path, monkeypatch, point, nth,
                                                                 torn):
    out = tmp_path / "run"
    stop_at(monkeypatch, point, nth)
    with pytest.raises(fp.Failpoint):
        head_train.main(args(store, out))
    monkeypatch.undo()
    where = out if torn.startswith("best/") else out / "checkpoints"
    assert (where / torn).exists()
    if point == "ckpt_file_write":  # cut in half: loading it would fail or give other numbers
        name = torn.split("/")[1]
        assert (where / torn).stat().st_size < (ref / "checkpoints/step_0000006" / name).stat().st_size
        assert not (out / "checkpoints/step_0000004").exists()
    if point == "best_write":
        assert not (out / "best/index.json").exists()  # the first best head: no index yet
    assert not (out / "head.safetensors").exists()
    assert head_train.main(args(store, out, "--resume")) == 0
    assert_same_run(out, ref)
    assert not list(out.glob("checkpoints/*.partial")) and not list(out.glob("checkpoints/*.deleting"))


def test_a_checkpoint_with_a_short_file_is_passed_over(store, ref, tmp_path, capsys):
    """A checkpoint that is not whole under its final name (a copy, a filesystem without atomic renames)
    is never loaded: its sizes differ from state.json, so the resume starts from the one before."""
    out = tmp_path / "run"
    assert head_train.main(args(store, out, "--stop-after", "4", "--keep-last", "2")) == 0
    opt = out / "checkpoints/step_0000004/optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # the torn line a kill mid-log leaves
    assert head_train.main(args(store, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "step_0000004 is not a whole checkpoint (optimizer.safetensors has" in err and "not loaded" in err
    assert_same_run(out, ref)


def test_disk_full_in_a_checkpoint_write_is_one_line_and_resume_completes(store, ref, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setitem(fp._ACTIVE, "ckpt_file_write", ("enospc", 6))  # the optimizer file of step 4 (head, rng, optimizer)
    monkeypatch.setattr(fp, "_hits", {})
    assert head_train.main(args(store, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = [x for x in err if x.startswith("head-train:")][-1]
    assert line.startswith("head-train: stopped: writing checkpoint ") and "step_0000004 failed: [Errno 28] No space" in line
    assert "the last good checkpoint is " in line and "step_0000002 (step 2)" in line and line.endswith("--resume")
    assert not list((out / "checkpoints").glob("*.partial"))  # the half checkpoint's space is given back
    assert run_dir.latest_checkpoint(out).name == "step_0000002"
    assert run_dir.checkpoint_problem(out / "checkpoints/step_0000002") is None
    monkeypatch.undo()
    assert head_train.main(args(store, out, "--resume")) == 0
    assert_same_run(out, ref)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_full_tmpfs_during_a_checkpoint_then_more_space(store, ref, tmp_path, capsys):
    mnt = tmp_path / "mnt"
    ck = ref / "checkpoints/step_0000006"
    one = sum(f.stat().st_size for f in ck.iterdir())
    # room for the run's small files and one checkpoint, not for a second one beside it
    if not _mount_tmpfs(mnt, f"{(one * 3 // 2 + 64 * 1024) // 1024}k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the ENOSPC failpoint test covers the code path")
    try:
        out = mnt / "run"
        assert head_train.main(args(store, out, "--keep-best", "0")) == 1
        line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("head-train:")][-1]
        assert "No space left on device" in line and "step_0000002 (step 2)" in line and line.endswith("--resume")
        assert run_dir.latest_checkpoint(out).name == "step_0000002"
        assert not list((out / "checkpoints").glob("*.partial"))
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)  # "free space"
        assert head_train.main(args(store, out, "--resume", "--keep-best", "0")) == 0
        a, _ = load_head_file(ref / "head.safetensors")
        b, _ = load_head_file(out / "head.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert [r for r in metrics(out)] == [{k: v for k, v in r.items()} for r in metrics(ref)]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_sigkill_with_the_optimizer_half_written_then_resume(store, ref, tmp_path):
    """A real head-train process, its background writer held with step 4's optimizer file cut in half,
    SIGKILLed (its lock goes stale); --resume takes the lock over and gives the uninterrupted run."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALPAMAYO_FAILPOINTS": "ckpt_file_write=hold@6",
           "ALPAMAYO_FAILPOINTS_MARKER": str(marker), "TQDM_DISABLE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "head_trainer.head_train", *args(store, out)], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        end = time.time() + 120
        while not (marker.exists() and marker.read_text().strip()):
            assert p.poll() is None, p.stderr.read()[-2000:]
            assert time.time() < end, "failpoint never reached"
            time.sleep(0.05)
        hit = json.loads(marker.read_text().splitlines()[0])
        assert hit["file"] == "optimizer.safetensors" and hit["step"] == "4"
        torn = out / "checkpoints/step_0000004.partial/optimizer.safetensors"
        assert torn.stat().st_size < (ref / "checkpoints/step_0000006/optimizer.safetensors").stat().st_size
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert (out / ".lock").exists() and not (out / "checkpoints/step_0000004").exists()
    assert head_train.main(args(store, out, "--resume")) == 0
    assert_same_run(out, ref)
