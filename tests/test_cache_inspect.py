"""cache-inspect CLI on a tiny store: every sub-command, exit codes, filters, the probe on a planted
signal (must find it) and on noise (must not)."""

import numpy as np
import pytest

from cache_builder.cache_inspect import main
from shared.store import KVSpec, StoreWriter, sample_id, synthetic_sample

PROV = dict(checkpoint="tiny@abc", head_config_hash="h1", processor="proc@1", prefix_mode="sft-no-cot",
            dataset_revision="r1", code_version="test")
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10), kv_dtype="float32",
              codec="none")


def _yaw(rot):
    return float(np.unwrap(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))[-1])


def build(path, n=40, planted=True) -> list:
    ss = []
    with StoreWriter.create(str(path), PROV, SPEC) as w:
        for i in range(n):
            s = synthetic_sample(i, SPEC, split="val" if i % 4 == 0 else "train")
            if planted:  # the prefix "knows" the future heading change through hidden channel 3
                s.hidden[:, 3] += 50.0 * _yaw(s.ego_future_rot)
            w.write(s)
            ss.append(s)
    return ss


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = tmp_path_factory.mktemp("inspect") / "c"
    return p, build(p)


def test_summary(store, capsys):
    path, ss = store
    assert main(["summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "samples      40" in out and "checkpoint" in out and "tiny@abc" in out and "'val': 10" in out
    assert f"tokens {sum(s.prefix_len for s in ss):,}" in out


def test_ls_filters(store, capsys):
    path, ss = store
    assert main(["ls", str(path), "--split", "val", "--camera-config", "front-only"]) == 0
    out = capsys.readouterr().out
    want = [s for s in ss if s.split == "val" and s.camera_config == "front-only"]
    assert f"{len(want)} of 40 samples" in out and all(s.key in out for s in want)
    thr = float(np.median([s.curvature["max_abs"] for s in ss]))
    assert main(["ls", str(path), "--min-curvature", str(thr)]) == 0
    n = sum(s.curvature["max_abs"] >= thr for s in ss)
    assert f"{n} of 40 samples" in capsys.readouterr().out
    assert main(["ls", str(path), "--min-curvature", "0.1", "--curvature-stat", "peak"]) == 2
    assert "no curvature statistic 'peak'" in capsys.readouterr().err


def test_show_writes_png(store, tmp_path, capsys):
    path, ss = store
    s = next(x for x in ss if x.reasoning)
    out = tmp_path / "s.png"
    assert main(["show", str(path), s.key, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert s.reasoning in text and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", str(path), "3"]) == 0
    assert main(["show", str(path), "999"]) == 2 and "out of range" in capsys.readouterr().err


def test_probe_finds_planted_signal_and_not_noise(store, tmp_path, capsys):
    path, _ = store
    assert main(["probe", str(path), "--alpha", "1"]) == 0
    out = capsys.readouterr().out
    r2 = [float(line.split()[3]) for line in out.splitlines() if line.startswith("all ")][0]
    assert r2 > 0.9, out
    noise = tmp_path / "noise"
    build(noise, planted=False)
    assert main(["probe", str(noise), "--alpha", "1"]) == 0
    out = capsys.readouterr().out
    r2n = [float(line.split()[3]) for line in out.splitlines() if line.startswith("all ")][0]
    assert r2n < 0.3, out
    assert main(["probe", str(path), "--feature", "v-last-mean"]) == 0
    assert main(["probe", str(path), "--feature", "bogus"]) == 2


def test_verify_exit_codes(tmp_path, capsys):
    path = tmp_path / "c"
    ss = build(path, n=4, planted=False)
    assert main(["verify", str(path)]) == 0 and "OK" in capsys.readouterr().out
    kv = path / "samples" / sample_id(ss[0].key) / "kv"
    chunk = sorted(p for p in kv.iterdir() if p.name.startswith("c"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0x01
    chunk.write_bytes(bytes(raw))
    assert main(["verify", str(path), "--quick"]) == 0  # metadata only cannot see it
    assert main(["verify", str(path)]) == 1
    assert "checksum mismatch" in capsys.readouterr().out


def test_clear_errors(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no cache at" in err and "cache-build" in err
    assert main(["summary", str(tmp_path / "nope"), "--storage-options", "{bad"]) == 2
    assert "--storage-options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
