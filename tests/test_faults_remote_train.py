"""head-train and head-eval reading an s3:// store whose endpoint (moto on loopback) stops and restarts
mid-run: inside the retry budget the run is bitwise the run without the outage; past it, one line
naming the sample and the way on (--resume), and the resumed run is again bitwise the same. Endpoint
and retry settings reach them through the environment (AWS_ENDPOINT_URL, ALPAMAYO_STORE_RETRY)."""

import json
import logging
import time

import pytest
import torch

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3_endpoint import S3Endpoint  # noqa: E402
from train_store import write_train_store  # noqa: E402

from head_trainer import head_eval, head_train  # noqa: E402
from shared.checkpoint import load_head_file  # noqa: E402
from shared.store import Store  # noqa: E402

URL = "s3://kvcache/train"
FAST = "attempts=30,first_delay_s=0.1,max_delay_s=0.4,budget_s=15"
SHORT = "attempts=3,first_delay_s=0.1,max_delay_s=0.2,budget_s=0.5"


@pytest.fixture(scope="module")
def s3(tiny_checkpoint, tmp_path_factory):
    """A 12-sample training store uploaded to the endpoint; the process environment points s3:// at it."""
    local = write_train_store(tmp_path_factory.mktemp("remote") / "store", tiny_checkpoint, codec="none")
    mp = pytest.MonkeyPatch()
    with S3Endpoint() as ep:
        for k, v in ep.env().items():
            mp.setenv(k, v)
        mp.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore tries once: the outage reaches the store's retry layer
        import s3fs

        s3fs.S3FileSystem(**ep.options, skip_instance_cache=True).put(str(local) + "/", URL, recursive=True)
        yield ep
    mp.undo()


def args(out, *extra):
    return ["--cache", URL, "--out", str(out), "--steps", "4", "--batch-size", "2", "--warmup-steps", "1",
            "--save-every", "2", "--log-every", "1", "--val-every", "0", "--no-tensorboard", "--ram-cache-gb", "0",
            *extra]


def outage_at(monkeypatch, s3, n: int, seconds: float) -> list[int]:
    """The endpoint goes away at the n-th array read of the process (then comes back after `seconds`)."""
    calls = []
    real = Store.read_stored

    def read_stored(self, *a, **kw):
        calls.append(1)
        if len(calls) == n:
            s3.outage(seconds)
        return real(self, *a, **kw)

    monkeypatch.setattr(Store, "read_stored", read_stored)
    return calls


def head(out):
    return load_head_file(out / "head.safetensors")[0]


def assert_same_head(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(s3, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert head_train.main(args(out)) == 0
    return head(out)


def test_head_train_through_an_outage_is_bitwise_the_same(s3, reference, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", FAST)
    caplog.set_level(logging.WARNING, "alpamayo.store")
    calls = outage_at(monkeypatch, s3, 12, 1.5)  # in step 2 (reads: kv, traj, thumbs, token_ids per sample)
    assert head_train.main(args(tmp_path / "run")) == 0
    s3.wait_up()
    assert len(calls) > 12
    lines = [r.getMessage() for r in caplog.records if r.name == "alpamayo.store"]
    assert any(x.startswith("store: retry 1/29 in 0.1 s: GET s3://kvcache/train/samples/") for x in lines), lines[:3]
    assert_same_head(head(tmp_path / "run"), reference)


def test_head_train_past_the_budget_stops_in_one_line_and_resumes(s3, reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", SHORT)
    out = tmp_path / "run"
    outage_at(monkeypatch, s3, 3 * 4 * 2 + 1, 3.0)  # a read of step 3 (its loader reads ahead)
    assert head_train.main(args(out)) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("head-train: stopped")]
    assert len(err) == 1 and "before step 3: reading sample '" in err[0] and "the store did not answer" in err[0]
    assert "the run directory is intact: --resume (from step 2)" in err[0] and "--skip-bad-samples" not in err[0]
    s3.wait_up()
    assert (out / "checkpoints/step_0000002").is_dir() and not (out / "head.safetensors").exists()
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", FAST)
    assert head_train.main(args(out, "--resume")) == 0
    assert_same_head(head(out), reference)


def test_head_eval_past_the_budget_is_one_line_then_evaluates(s3, tmp_path, monkeypatch, capsys):
    ev = ["--cache", URL, "--split", "all", "--num-samples", "2", "--steps", "2", "--batch-size", "4"]
    assert head_eval.main([*ev, "--out", str(tmp_path / "ref.json")]) == 0
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", SHORT)
    outage_at(monkeypatch, s3, 6, 3.0)
    assert head_eval.main([*ev, "--out", str(tmp_path / "a.json"), "--skip-bad-samples"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("head-eval: error")]
    assert len(err) == 1 and "reading sample '" in err[0] and "the store did not answer" in err[0]
    assert not (tmp_path / "a.json").exists()  # not "skipped": the sample is not damaged
    s3.wait_up()
    assert head_eval.main([*ev, "--out", str(tmp_path / "a.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "ref.json"))
    assert a["per_sample"] == b["per_sample"]


def test_head_train_with_workers_past_the_budget_stops_in_one_line_and_resumes(s3, reference, tmp_path, monkeypatch,
                                                                              capsys):
    """--num-workers 2: the read that meets the outage runs in a worker process. The stop is the one line of
    workers 0 (torch would re-raise it with the worker's traceback), never a skip under --skip-bad-samples,
    and the resume with workers is bitwise the run without an outage.

    The endpoint lives in this process: a worker that reaches step 4's first sample waits until steps 1-3
    are read, asks this process (a watcher thread) to stop the endpoint, then reads into the outage."""
    import multiprocessing as mp
    import threading

    from head_trainer import data

    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", SHORT)
    st = Store.open(URL)
    per_sample = []
    real = Store.read_stored
    monkeypatch.setattr(Store, "read_stored", lambda self, *a, **kw: per_sample.append(1) or real(self, *a, **kw))
    data.read_raw(st, 0)  # reads of one sample (kv, traj, thumbs, token_ids)
    sampler = data.StepBatchSampler(data.split_indices(st, "train"), 2, 42, 0, 4)
    target = st.manifest(sampler.micro_batch(3, 0)[0])["key"]
    ctx = mp.get_context("fork")  # DataLoader workers are forked: they inherit these and the patch below
    reads, trigger, down = ctx.Value("i", 0), ctx.Event(), ctx.Event()

    def read_stored(self, i_or_key, *a, **kw):
        key = self.manifest(i_or_key)["key"]
        if key == target and not trigger.is_set():
            deadline = time.monotonic() + 30
            while reads.value < 3 * 2 * len(per_sample) and time.monotonic() < deadline:  # steps 1-3 read
                time.sleep(0.01)
            trigger.set()
            assert down.wait(30)
        out = real(self, i_or_key, *a, **kw)
        with reads.get_lock():  # reads done, not begun
            reads.value += 1
        return out

    def watch():
        if trigger.wait(120):
            s3.outage(3.0)
            down.set()

    monkeypatch.setattr(Store, "read_stored", read_stored)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = tmp_path / "run"
    assert head_train.main(args(out, "--num-workers", "2", "--skip-bad-samples")) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.startswith("head-train:") and "%|" not in x]
    assert len(lines) == 1 and "Traceback" not in err and "worker" not in err, err[-3000:]
    assert lines[0].startswith(f"head-train: stopped: before step 3: reading sample '{target}' (")
    assert "the store did not answer" in lines[0] and "--skip-bad-samples" not in lines[0]
    assert lines[0].endswith("the run directory is intact: --resume (from step 2)")
    s3.wait_up()
    watcher.join(5)
    assert (out / "checkpoints/step_0000002").is_dir() and not (out / "head.safetensors").exists()
    monkeypatch.setenv("ALPAMAYO_STORE_RETRY", FAST)
    assert head_train.main(args(out, "--resume", "--num-workers", "2")) == 0
    assert_same_head(head(out), reference)
