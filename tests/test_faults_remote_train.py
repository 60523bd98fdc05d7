"""head-train and head-eval reading an s3:// store whose endpoint (moto on loopback) stops and restarts
mid-run: inside the retry budget the run is bitwise the run without the outage; past it, one line
naming the sample and the way on (--resume), and the resumed run is again bitwise the same. Endpoint
and retry settings reach them through the environment (AWS_ENDPOINT_URL, ALPAMAYO_STORE_RETRY)."""

import json
import logging

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
