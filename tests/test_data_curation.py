"""Curation: curve scan precision/recall on planted curves, keyframe strategies, stable splits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cache_builder.curve_scan import CurveScanConfig, run
from shared.data import (
    hash_split,
    open_dataset,
    parse_keyframe_strategy,
    select_keyframes,
    write_synthetic_world,
)
from shared.data.curation import valid_t0_range
from shared.sample import DEFAULT_T0_US


@pytest.fixture(scope="module")
def ego_world(tmp_path_factory):
    """40 egomotion-only clips (random kinds after the first five), 4 chunks, no split column."""
    root = tmp_path_factory.mktemp("ego_world")
    truths = write_synthetic_world(root, n_clips=40, seed=3, n_chunks=4, cameras=(), split_column=False)
    return root, truths


def test_planted_set_has_every_kind(ego_world):
    kinds = {t.kind for t in ego_world[1]}
    assert kinds == {"straight", "gentle-left", "gentle-right", "sharp-left", "sharp-right"}


@pytest.mark.parametrize("source", ["path", "column"])
def test_curve_scan_precision_and_recall_are_one(ego_world, tmp_path, source):
    root, truths = ego_world
    out = tmp_path / "scan.json"
    run(CurveScanConfig(root, threshold=0.05, output=out, source=source, progress=False))
    report = json.loads(out.read_text())
    selected = set(report["selected"])
    sharp = {t.clip_id for t in truths if t.kind.startswith("sharp")}
    straight = {t.clip_id for t in truths if t.kind == "straight"}
    tp = len(selected & sharp)
    assert tp / len(selected) == 1.0 and tp / len(sharp) == 1.0
    assert not selected & straight
    assert report["n_scanned"] == 40 and report["skipped"]["n_skipped"] == 0
    rows = {r["clip_id"]: r for r in report["clips"]}
    for t in truths:
        row = rows[t.clip_id]
        assert row["split"] == hash_split(t.clip_id)
        if t.kind == "straight":
            assert row["direction"] == "straight" and row["max_abs_kappa"] < 0.01
        else:
            assert row["direction"] == t.kind.split("-")[1]  # left positive
            assert row["signed_peak_kappa"] == pytest.approx(t.peak_kappa, rel=0.03)
        if t.kind.startswith("sharp"):  # peak inside the curve plateau
            assert t.onset_us < row["t_peak_us"] < t.onset_us + 6_000_000


def test_curve_scan_top_k_max_clips_and_parquet(ego_world, tmp_path):
    root, truths = ego_world
    out = tmp_path / "scan.parquet"
    result = run(CurveScanConfig(root, threshold=0.05, top_k=2, max_clips=20, output=out, progress=False))
    df = pd.read_parquet(out)
    assert len(df) == 20 and (df["status"] == "scanned").all()
    top = df[df["selected"]].sort_values("rank")
    assert len(top) == 2 and top["clip_id"].tolist() == result["selected"]
    candidates = df[df["max_abs_kappa"] >= 0.05]["max_abs_kappa"].sort_values(ascending=False)
    assert top["max_abs_kappa"].tolist() == candidates.iloc[:2].tolist()
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        CurveScanConfig(root, output=out).validate()
    with pytest.raises(ValueError, match="--threshold must be > 0"):
        CurveScanConfig(root, threshold=0).validate()
    with pytest.raises(ValueError, match=r"\.json or \.parquet"):
        CurveScanConfig(root, output=tmp_path / "x.csv").validate()


def test_keyframe_strategies(ego_world):
    root, truths = ego_world
    ds = open_dataset(root)
    for t in truths[:5]:
        with ds.open_clip(t.clip_id) as clip:
            lo, hi = clip.window
            assert (lo, hi) == valid_t0_range(t.ego_timestamps_us[0], t.ego_timestamps_us[-1])
            assert lo == t.ego_timestamps_us[0] + 1_600_000 and hi == t.ego_timestamps_us[-1] - 6_400_000
            assert clip.keyframes("default") == [DEFAULT_T0_US]
            stride = clip.keyframes("stride:1.5")
            assert stride[0] >= lo and stride[0] - lo < 100_000 and stride[-1] <= hi
            assert set(np.diff(stride)) == {1_500_000}
            (peak,) = clip.keyframes("max-curvature")
            tk, kappa = clip.curvature()
            inside = (tk >= lo) & (tk <= hi)
            assert abs(kappa[tk == peak][0]) == np.abs(kappa[inside]).max()
            onsets = clip.keyframes("turn-onset")
            if t.kind.startswith("sharp"):
                assert len(onsets) == 1 and abs(onsets[0] - (t.onset_us - 500_000)) <= 150_000
            else:
                assert onsets == []


def test_keyframe_strategy_parsing_and_window_edges():
    assert parse_keyframe_strategy("stride:0.5").stride_us == 500_000
    assert parse_keyframe_strategy("stride:2").spec == "stride:2"
    for bad in ("stride:0", "stride:x", "every-second", "stride:-1"):
        with pytest.raises(ValueError, match="keyframe strategy"):
            parse_keyframe_strategy(bad)
    assert valid_t0_range(0, 8_000_000) == (1_600_000, 1_600_000)
    assert valid_t0_range(0, 7_999_999) is None
    t = np.arange(0, 20_000_001, 100_000)
    k = np.zeros_like(t, dtype=float)
    k[(t > 15_000_000)] = 0.2  # a curve after the last valid t0 is not a max-curvature keyframe
    k[t == 3_000_000] = -0.03
    assert select_keyframes("max-curvature", t, k, (1_600_000, 13_600_000)) == [3_000_000]
    assert select_keyframes("stride:5", t, k, None) == []


def test_split_is_stable_across_runs_and_chunk_subsets(ego_world, tmp_path):
    root, truths = ego_world
    # golden values: sha256(clip_id) mod 100, 0-89 train / 90-99 val; independent of process and machine
    assert hash_split("00000000-0000-0000-0000-000000000000") == "val"  # bucket 96
    ids = [f"clip-{i}" for i in range(2000)]
    val = [i for i in ids if hash_split(i) == "val"]
    assert 0.08 < len(val) / len(ids) < 0.12
    assert val[:3] == ["clip-3", "clip-7", "clip-22"]
    full = open_dataset(root)
    splits = {t.clip_id: full.split_of(t.clip_id) for t in truths}
    assert splits == {t.clip_id: hash_split(t.clip_id) for t in truths}
    # a download holding only chunks 1 and 3
    subset = tmp_path / "subset"
    shutil.copytree(root, subset)
    for chunk in (0, 2):
        (subset / f"labels/egomotion/egomotion.chunk_{chunk:04d}.zip").unlink()
    part = open_dataset(subset)
    assert part.clip_ids() == [t.clip_id for t in truths if t.chunk in (1, 3)]
    assert {c: part.split_of(c) for c in splits} == splits
    # the dataset's own split column wins when present
    index = pd.read_parquet(subset / "clip_index.parquet")
    index["split"] = ["test" if i % 2 else "train" for i in range(len(index))]
    index.to_parquet(subset / "clip_index.parquet")
    own = open_dataset(subset)
    assert [own.split_of(c) for c in index.index] == index["split"].tolist()
