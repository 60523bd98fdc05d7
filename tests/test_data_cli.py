"""The synth-world and curve-scan console entry points: argv -> validated config -> files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cache_builder import curve_scan, synth_world
from shared.data import load_truth, open_dataset


def test_synth_world_then_curve_scan(tmp_path, capsys):
    out = tmp_path / "world"
    argv = [
        str(out),
        "--clips",
        "3",
        "--seed",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--chunks",
        "2",
        "--cameras",
        "front-only",
        "--duration",
        "12",
    ]
    assert synth_world.main(argv) == 0
    assert "3 clips in 2 chunk(s) at 32x32" in capsys.readouterr().out
    ds = open_dataset(out)
    truth = load_truth(out)
    assert ds.clip_ids() == [t["clip_id"] for t in truth]
    assert [t["kind"] for t in truth] == ["sharp-left", "straight", "sharp-right"]
    assert sorted(ds.clip_index["chunk"].unique()) == [0, 1]
    assert (out / "camera/camera_front_wide_120fov/camera_front_wide_120fov.chunk_0001.zip").is_file()
    assert not (out / "camera/camera_cross_left_120fov").exists()
    # refuses to overwrite without --overwrite, and says so
    assert synth_world.main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    report = tmp_path / "scan.json"
    assert curve_scan.main([str(out), "--threshold", "0.05", "--output", str(report), "--no-progress"]) == 0
    data = json.loads(report.read_text())
    sharp = [t["clip_id"] for t in truth if t["kind"].startswith("sharp")]
    assert sorted(data["selected"]) == sorted(sharp)
    assert data["dataset_revision"].startswith("synthetic-")
    assert "2 selected" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--clips", "0"], "--clips must be >= 1"),
        (["--clips", "2", "--chunks", "3"], "--chunks must be in 1..clips"),
        (["--width", "33"], "--width/--height must be even"),
        (["--duration", "5"], "--duration must be >= 8"),
        (["--cameras", "front_wide,bogus"], "unknown camera 'bogus'"),
    ],
)
def test_synth_world_validates_before_work(tmp_path, capsys, argv, message):
    out = tmp_path / "w"
    with pytest.raises(ValueError, match=message):
        synth_world.run(synth_world.parse_args([str(out), *argv]))
    assert synth_world.main([str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_egomotion_only_world_and_curve_scan_errors(tmp_path, capsys):
    out = tmp_path / "ego"
    assert synth_world.main([str(out), "--clips", "6", "--cameras", "none"]) == 0
    assert not (out / "camera").exists()
    assert curve_scan.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert curve_scan.main([str(out), "--top-k", "0"]) == 2
    pq = tmp_path / "scan.parquet"
    assert (
        curve_scan.main([str(out), "--top-k", "1", "--max-clips", "4", "--output", str(pq), "--no-progress"])
        == 0
    )
    df = pd.read_parquet(pq)
    assert len(df) == 4 and df["selected"].sum() == 1 and set(df["split"]) <= {"train", "val"}
