"""Bad input: each corruption raises a ClipDataError naming clip, file and reason; batches skip and count."""

from __future__ import annotations

import json

import pytest

from cache_builder.curve_scan import CurveScanConfig, run
from shared.data import ClipDataError, SkipReport, corrupt_clip, iter_samples, load_sample, open_dataset
from shared.data import errors as E
from shared.data.synthetic import write_synthetic_world
from shared.sample import DEFAULT_T0_US

SIDE = "camera_cross_left_120fov"
FRONT = "camera_front_wide_120fov"
# corruption -> (camera it damages, expected reason, expected substring of the error's path)
CASES = {
    "missing-camera-member": (SIDE, E.MISSING_MEMBER, f"{SIDE}.chunk_{{chunk:04d}}.zip::{{cid}}.{SIDE}.mp4"),
    "truncated-mp4": (FRONT, E.CORRUPT_VIDEO, f"{FRONT}.chunk_{{chunk:04d}}.zip::{{cid}}.{FRONT}.mp4"),
    "corrupt-mp4": (FRONT, E.CORRUPT_VIDEO, f"::{{cid}}.{FRONT}.mp4"),
    "short-egomotion": (
        FRONT,
        E.EGOMOTION_COVERAGE,
        "egomotion.chunk_{chunk:04d}.zip::{cid}.egomotion.parquet",
    ),
    "nan-egomotion": (FRONT, E.NAN_VALUES, "::{cid}.egomotion.parquet"),
    "non-increasing-egomotion": (FRONT, E.NON_INCREASING_TIMESTAMPS, "::{cid}.egomotion.parquet"),
    "non-increasing-frame-timestamps": (
        FRONT,
        E.NON_INCREASING_TIMESTAMPS,
        f"::{{cid}}.{FRONT}.timestamps.parquet",
    ),
    "dropped-frame-timestamp": (FRONT, E.FRAME_COUNT_MISMATCH, f"::{{cid}}.{FRONT}.mp4"),
    "absent-from-index": (FRONT, E.NOT_IN_INDEX, "clip_index.parquet"),
    "wrong-chunk": (FRONT, E.WRONG_CHUNK, "egomotion.chunk_{chunk:04d}.zip::{cid}.egomotion.parquet"),
}


@pytest.fixture(scope="module")
def bad_world(tmp_path_factory):
    """12 tiny clips in 2 chunks: clip i < 10 gets corruption i, clips 10-11 stay good (chunk 1)."""
    root = tmp_path_factory.mktemp("bad_world")
    truths = write_synthetic_world(
        root,
        n_clips=12,
        seed=5,
        width=48,
        height=32,
        n_chunks=2,
        duration_s=12.0,
        kinds=["straight", "sharp-left"],
    )
    assert [t.chunk for t in truths] == [0] * 6 + [1] * 6
    victims = [t.clip_id for t in truths[:10]]
    good = [t.clip_id for t in truths[10:]]
    for cid, (kind, (camera, _, _)) in zip(victims, CASES.items()):
        corrupt_clip(root, cid, kind, camera=camera)
    return root, dict(zip(CASES, victims)), good, {t.clip_id: t.chunk for t in truths}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_bad_input_raises_named_error(bad_world, kind):
    root, victims, _, chunks = bad_world
    cid = victims[kind]
    camera, reason, where = CASES[kind]
    ds = open_dataset(root)
    with pytest.raises(ClipDataError) as info:
        load_sample(ds, cid, DEFAULT_T0_US)
    err = info.value
    indexed = chunks[cid] if kind != "wrong-chunk" else 1 - chunks[cid]  # the chunk the index names
    expected_where = where.format(cid=cid, chunk=indexed)
    assert err.clip_id == cid and err.reason == reason, str(err)
    assert expected_where in err.path, err.path
    assert cid in str(err) and reason in str(err)
    if kind == "wrong-chunk":
        assert err.detail == f"clip_index.parquet says chunk {indexed}, member is in chunk {chunks[cid]}"


def test_skip_report_counts_every_reason_and_keeps_good_clips(bad_world):
    root, victims, good, _ = bad_world
    ds = open_dataset(root)
    ids = list(victims.values()) + good
    it = iter_samples(ds, clip_ids=ids)
    samples = list(it)
    assert [s.clip_id for s in samples] == good
    expected = {}
    for _, reason, _ in CASES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert it.report.counts == expected
    assert sorted(it.report.clip_ids) == sorted(victims.values())
    item = next(i for i in it.report.items if i.clip_id == victims["nan-egomotion"])
    assert item.reason == E.NAN_VALUES and "['x']" in item.detail and item.file.endswith(".egomotion.parquet")
    # a shared report accumulates across calls; front-masked never decodes the side camera
    report = SkipReport()
    masked = list(
        iter_samples(ds, [victims["missing-camera-member"]], camera_config="front-masked", report=report)
    )
    assert len(masked) == 1 and len(report) == 0
    list(iter_samples(ds, [victims["truncated-mp4"]], camera_config="front-only", report=report))
    assert report.counts == {E.CORRUPT_VIDEO: 1}
    assert report.to_dict()["items"][0]["clip_id"] == victims["truncated-mp4"]


def test_missing_chunk_file_and_clip_ids_of_partial_download(bad_world, tmp_path):
    import shutil

    root, _, good, _ = bad_world
    copy = tmp_path / "partial"
    shutil.copytree(root, copy)
    (copy / "camera/camera_front_tele_30fov/camera_front_tele_30fov.chunk_0001.zip").unlink()
    ds = open_dataset(copy)
    with pytest.raises(ClipDataError, match="missing-file") as info:
        load_sample(ds, good[0], DEFAULT_T0_US)
    assert info.value.path.endswith("camera_front_tele_30fov.chunk_0001.zip")
    assert load_sample(ds, good[0], DEFAULT_T0_US, camera_config="front-masked").images.shape[0] == 4
    (copy / "labels/egomotion/egomotion.chunk_0001.zip").unlink()
    assert not set(good) & set(open_dataset(copy).clip_ids())


def test_curve_scan_skips_and_reports(bad_world, tmp_path):
    root, victims, good, _ = bad_world
    out = tmp_path / "scan.json"
    result = run(CurveScanConfig(root, output=out, progress=False))
    report = json.loads(out.read_text())
    assert report["skipped"] == result["skipped"]
    # egomotion problems are skipped; camera problems do not matter to a curvature scan
    assert report["skipped"]["counts"] == {E.NAN_VALUES: 1, E.NON_INCREASING_TIMESTAMPS: 1, E.WRONG_CHUNK: 1}
    scanned = {r["clip_id"] for r in report["clips"]}
    assert victims["truncated-mp4"] in scanned and victims["absent-from-index"] not in scanned
    assert set(good) <= scanned and report["n_scanned"] == 11
    assert {r["clip_id"] for r in report["clips"] if r["selected"]} == {
        r["clip_id"] for r in report["clips"] if r["direction"] == "left" and r["max_abs_kappa"] > 0.05
    }
