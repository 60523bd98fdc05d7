"""Reader round trip on a synthetic world: poses, frame timestamps, curvature sign, cameras, layout."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import av
import numpy as np
import pandas as pd
import pytest

from shared.data import (
    ClipDataError,
    DatasetLayoutError,
    iter_samples,
    load_sample,
    open_dataset,
    resolve_camera_config,
    write_synthetic_world,
)
from shared.data.reader import EGO_COLUMNS, FUTURE_OFFSETS_US, HISTORY_OFFSETS_US
from shared.data.synthetic import make_clip, read_barcode
from shared.sample import CAMERA_INDEX, DEFAULT_T0_US, FRAME_OFFSETS_US, FRONT_CAMERA, RELEASE_CAMERAS

KINDS = ["sharp-left", "sharp-right", "straight", "gentle-left", "gentle-right", "sharp-left"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    truths = write_synthetic_world(
        root, n_clips=6, seed=11, width=160, height=96, n_chunks=2, kinds=KINDS, frame_barcode=True
    )
    return root, truths


@pytest.fixture(scope="module")
def ds(world):
    return open_dataset(world[0])


def test_layout_matches_the_real_download(world):
    root, truths = world
    features = pd.read_csv(root / "features.csv", index_col="feature")
    assert list(features.columns) == ["directory", "chunk_path", "clip_files_in_zip"]
    assert features.at["egomotion", "chunk_path"] == "labels/egomotion/egomotion.chunk_{chunk_id:04d}.zip"
    assert json.loads(features.at["egomotion", "clip_files_in_zip"]) == {
        "egomotion": "{clip_id}.egomotion.parquet"
    }
    cam = features.loc[FRONT_CAMERA]
    assert cam["chunk_path"] == f"camera/{FRONT_CAMERA}/{FRONT_CAMERA}.chunk_{{chunk_id:04d}}.zip"
    assert json.loads(cam["clip_files_in_zip"])["video"] == f"{{clip_id}}.{FRONT_CAMERA}.mp4"
    index = pd.read_parquet(root / "clip_index.parquet")
    assert index.index.name == "clip_id"
    assert str(index["chunk"].dtype) == "int64" and sorted(index["chunk"].unique()) == [0, 1]
    assert set(index.columns) == {"chunk", "split", "clip_is_valid"}
    assert set(pd.read_parquet(root / "metadata/data_collection.parquet").columns) == {
        "country",
        "month",
        "hour_of_day",
        "platform_class",
    }
    presence = pd.read_parquet(root / "metadata/feature_presence.parquet")
    assert (
        presence.loc[truths[0].clip_id, FRONT_CAMERA]
        and not presence.loc[truths[0].clip_id, "camera_rear_tele_30fov"]
    )
    # chunk zips: stored, holding exactly the clip members of that chunk
    in_chunk1 = [t.clip_id for t in truths if t.chunk == 1]
    with zipfile.ZipFile(root / f"camera/{FRONT_CAMERA}/{FRONT_CAMERA}.chunk_0001.zip") as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert sorted(zf.namelist()) == sorted(
            f"{c}.{FRONT_CAMERA}.{m}"
            for c in in_chunk1
            for m in ("mp4", "timestamps.parquet", "blurred_boxes.parquet")
        )
        mp4 = zf.read(f"{in_chunk1[0]}.{FRONT_CAMERA}.mp4")
        ts = pd.read_parquet(io.BytesIO(zf.read(f"{in_chunk1[0]}.{FRONT_CAMERA}.timestamps.parquet")))
    with zipfile.ZipFile(root / "labels/egomotion/egomotion.chunk_0001.zip") as zf:
        ego = pd.read_parquet(io.BytesIO(zf.read(f"{in_chunk1[0]}.egomotion.parquet")))
    assert list(ego.columns) == list(EGO_COLUMNS)
    assert ego["timestamp"].dtype == np.int64 and all(ego[c].dtype == np.float64 for c in EGO_COLUMNS[1:])
    assert 95 < 1e6 / np.diff(ego["timestamp"]).mean() < 105  # ~100 Hz
    assert list(ts.columns) == ["timestamp"] and ts["timestamp"].dtype == np.int64
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 30
        assert (stream.width, stream.height) == (160, 96) and stream.frames == len(ts)
        pts = [p.pts for p in container.demux(stream) if p.pts is not None]
        per_frame = int(1 / (30 * stream.time_base))  # inside: PyAV 18.1.1 refuses a closed container's stream
    assert min(pts) == 0 and sorted(pts) == [i * per_frame for i in range(len(ts))]  # CFR, first pts 0


def test_open_reports_index_revision_and_splits(ds, world):
    _, truths = world
    assert ds.clip_ids() == [t.clip_id for t in truths]
    assert ds.revision is not None and ds.revision.startswith("synthetic-")
    assert all(ds.split_of(t.clip_id) == t.split for t in truths)
    assert [ds.chunk_of(t.clip_id) for t in truths] == [0, 0, 0, 1, 1, 1]


def test_poses_match_ground_truth_within_1cm(ds, world):
    """Every clip, several t0s: history and future in the t0 rig frame equal the continuous-time truth."""
    _, truths = world
    for truth in truths:
        with ds.open_clip(truth.clip_id) as clip:
            for t0 in (DEFAULT_T0_US, 2_000_000, 7_350_000):
                hist_xyz, hist_rot, fut_xyz, fut_rot = clip.ego_local(t0)
                exp_xyz, exp_rot = truth.local_trajectory(
                    t0, np.concatenate([HISTORY_OFFSETS_US, FUTURE_OFFSETS_US])
                )
                assert hist_xyz.shape == (16, 3) and fut_rot.shape == (64, 3, 3)
                np.testing.assert_allclose(np.concatenate([hist_xyz, fut_xyz]), exp_xyz, atol=0.01, rtol=0)
                np.testing.assert_allclose(np.concatenate([hist_rot, fut_rot]), exp_rot, atol=1e-4, rtol=0)
                np.testing.assert_allclose(hist_xyz[-1], 0, atol=1e-9)
                np.testing.assert_allclose(hist_rot[-1], np.eye(3), atol=1e-9)


def test_sample_matches_truth_and_curvature_sign(ds, world):
    _, truths = world
    for truth in truths:
        s = load_sample(ds, truth.clip_id, DEFAULT_T0_US)
        assert s.clip_id == truth.clip_id and s.t0_us == DEFAULT_T0_US and s.split == truth.split
        assert s.images.shape == (4, 4, 3, 96, 160) and s.images.dtype == np.uint8
        assert s.camera_names == tuple(sorted(RELEASE_CAMERAS, key=CAMERA_INDEX.__getitem__))
        assert s.camera_indices.tolist() == [0, 1, 2, 6] and s.camera_config == "full"
        exp, _ = truth.local_trajectory(DEFAULT_T0_US, FUTURE_OFFSETS_US)
        assert np.abs(s.ego_future_xyz - exp).max() < 0.01
        stats = s.meta["curvature"]
        assert s.meta["keyframe_strategy"] == "explicit" and s.meta["chunk"] == truth.chunk
        if truth.kind.startswith("straight"):
            assert stats["direction"] == "straight"
        else:
            side = truth.kind.split("-")[1]
            assert stats["direction"] == side
            assert np.sign(stats["signed_peak_kappa"]) == (1 if side == "left" else -1)
            assert stats["signed_peak_kappa"] == pytest.approx(truth.peak_kappa, rel=0.03)
            # left positive also in the future path itself: y grows to the left
            assert np.sign(s.ego_future_xyz[-1, 1]) == np.sign(truth.peak_kappa)
        if truth.kind.startswith("sharp"):  # the case this project exists for: straight history
            assert np.abs(s.ego_history_xyz[:, 1]).max() < 0.01
            assert abs(s.ego_future_xyz[-1, 1]) > 5.0


def test_frame_timestamps_exact_and_right_frames_decoded(ds, world):
    """Latest frame at or before t0-0.3..t0 per camera; the decoded pixels are that frame (barcode)."""
    _, truths = world
    truth = truths[3]
    s = load_sample(ds, truth.clip_id, 6_123_456)
    requested = 6_123_456 + np.asarray(FRAME_OFFSETS_US)
    for c, cam in enumerate(s.camera_names):
        ts = truth.frame_timestamps_us[cam]
        idx = np.searchsorted(ts, requested, side="right") - 1
        assert s.frame_timestamps_us[c].tolist() == ts[idx].tolist()
        assert (s.frame_timestamps_us[c] <= requested).all()
        decoded = [read_barcode(s.images[c, f].transpose(1, 2, 0)) for f in range(4)]
        assert decoded == idx.tolist()


def test_camera_configs(ds, world):
    _, truths = world
    cid = truths[0].clip_id
    full = load_sample(ds, cid, DEFAULT_T0_US)
    masked = load_sample(ds, cid, DEFAULT_T0_US, camera_config="front-masked")
    assert masked.images.shape == full.images.shape and masked.camera_config == "front-masked"
    assert masked.camera_indices.tolist() == [0, 1, 2, 6]
    assert (masked.images[[0, 2, 3]] == 0).all()
    np.testing.assert_array_equal(masked.images[1], full.images[1])
    assert (masked.frame_timestamps_us == full.frame_timestamps_us[1]).all()
    front = load_sample(ds, cid, DEFAULT_T0_US, camera_config="front-only")
    assert front.images.shape == (1, 4, 3, 96, 160) and front.camera_names == (FRONT_CAMERA,)
    np.testing.assert_array_equal(front.images[0], full.images[1])
    pair = load_sample(ds, cid, DEFAULT_T0_US, camera_config="front_tele,front_wide")
    assert pair.camera_names == (FRONT_CAMERA, "camera_front_tele_30fov")
    assert pair.camera_config == "camera_front_wide_120fov,camera_front_tele_30fov"
    np.testing.assert_array_equal(pair.images[1], full.images[3])
    assert (full.images[0] != full.images[2]).any()  # cameras really see different views
    with pytest.raises(ValueError, match="unknown camera 'rear_nope'"):
        resolve_camera_config("front_wide,rear_nope")
    with pytest.raises(ClipDataError, match="feature-absent"):  # not rendered -> marked absent in metadata
        load_sample(ds, cid, DEFAULT_T0_US, camera_config="rear_tele")


def test_iter_samples_strategies(ds, world):
    _, truths = world
    it = iter_samples(ds, keyframes="stride:4", camera_config="front-only")
    samples = list(it)
    assert len(it.report) == 0
    # valid window ~[0.6 s, 14.6 s] -> t0 = 0.7, 4.7, 8.7, 12.7 (first multiple of 0.1 s, then every 4 s)
    per_clip = {}
    for s in samples:
        per_clip.setdefault(s.clip_id, []).append(s.t0_us)
        assert s.meta["keyframe_strategy"] == "stride:4"
    assert list(per_clip) == [t.clip_id for t in truths]
    assert all(len(v) == 4 and np.all(np.diff(v) == 4_000_000) for v in per_clip.values())
    onset = iter_samples(ds, keyframes="turn-onset", camera_config="front-only")
    got = {s.clip_id: s.t0_us for s in onset}
    sharp = {t.clip_id: t.onset_us for t in truths if t.kind.startswith("sharp")}
    assert set(got) == set(sharp)
    for cid, t0 in got.items():  # decision moment: 0.5 s before the planted onset (10 Hz grid)
        assert abs(t0 - (sharp[cid] - 500_000)) <= 150_000
    assert onset.report.counts == {"no-keyframe": 3}


def test_hub_cache_layout_and_download_metadata(world, tmp_path):
    root, truths = world
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--nvidia--PhysicalAI-Autonomous-Vehicles"
    shutil.copytree(root, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub = open_dataset(tmp_path / "hub")
    assert hub.revision == commit and hub.clip_ids() == [t.clip_id for t in truths]
    assert load_sample(hub, truths[0].clip_id, DEFAULT_T0_US, "front-only").images.shape[0] == 1
    # plain local_dir download: huggingface_hub records the commit per file
    local = tmp_path / "local"
    shutil.copytree(root, local)
    (local / "revision").unlink()
    assert open_dataset(local).revision is None
    meta = local / ".cache/huggingface/download/features.csv.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text(f"{commit}\netag\n1712656091.1\n")
    assert open_dataset(local).revision == commit


def test_open_errors_name_the_file(world, tmp_path):
    root, _ = world
    with pytest.raises(DatasetLayoutError, match="features.csv: missing"):
        open_dataset(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(root, bad, ignore=shutil.ignore_patterns("*.zip"))
    index = pd.read_parquet(bad / "clip_index.parquet")
    index["chunk"] = index["chunk"].astype(float)
    index.iloc[0, 0] = np.nan
    index.to_parquet(bad / "clip_index.parquet")
    with pytest.raises(DatasetLayoutError, match=r"clip_index.parquet: 'chunk' must be int64"):
        open_dataset(bad)
    features = pd.read_csv(root / "features.csv")
    features.loc[0, "clip_files_in_zip"] = "{not json"
    features.to_csv(bad / "features.csv", index=False)
    with pytest.raises(DatasetLayoutError, match="features.csv: feature 'egomotion': clip_files_in_zip"):
        open_dataset(bad)


def test_generator_is_deterministic_and_physical():
    a, _, _, ego_a = make_clip(5, 3, kind="sharp-right")
    b, _, _, ego_b = make_clip(5, 3, kind="sharp-right")
    assert a.clip_id == b.clip_id
    pd.testing.assert_frame_equal(ego_a, ego_b)
    assert make_clip(6, 3, kind="sharp-right")[0].clip_id != a.clip_id
    for kind in ("sharp-left", "sharp-right", "gentle-left", "straight"):
        for seed in range(4):
            truth, _, _, ego = make_clip(seed, 0, kind=kind)
            yaw = 2 * np.arctan2(ego["qz"], ego["qw"])
            speed = np.hypot(ego["vx"], ego["vy"])
            # heading is the direction of motion; velocity is the derivative of position
            np.testing.assert_allclose(
                np.arctan2(ego["vy"], ego["vx"]), np.angle(np.exp(1j * yaw)), atol=1e-9
            )
            t = ego["timestamp"].to_numpy() / 1e6
            np.testing.assert_allclose(np.gradient(ego["x"], t)[1:-1], ego["vx"][1:-1], atol=2e-3)
            assert 5.0 <= speed.min() and speed.max() <= 20.0
            lat = -ego["ax"] * np.sin(yaw) + ego["ay"] * np.cos(yaw)
            assert np.abs(lat).max() <= 4.0
            np.testing.assert_allclose(lat, speed**2 * ego["curvature"], atol=1e-9)
            if kind != "straight":
                assert np.sign(truth.peak_kappa) == (1 if "left" in kind else -1)
                assert np.sign(ego["curvature"].iloc[np.argmax(np.abs(ego["curvature"]))]) == np.sign(
                    truth.peak_kappa
                )
            if kind.startswith("sharp"):
                assert DEFAULT_T0_US + 200_000 <= truth.onset_us <= DEFAULT_T0_US + 600_000
                assert 0.07 <= abs(truth.peak_kappa) <= 0.12


def test_official_devkit_reads_the_synthetic_world(world, tmp_path, monkeypatch):
    """Cross-check of the format: the devkit's own dataset interface (offline, hub cache) opens it."""
    import huggingface_hub.constants
    from physical_ai_av.dataset import PhysicalAIAVDatasetInterface

    root, truths = world
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "datasets--nvidia--PhysicalAI-Autonomous-Vehicles"
    shutil.copytree(root, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    devkit = PhysicalAIAVDatasetInterface(revision=commit, cache_dir=tmp_path)
    truth = truths[4]
    assert devkit.get_clip_chunk(truth.clip_id) == 1
    interp = devkit.get_clip_feature(truth.clip_id, "egomotion")
    reader = devkit.get_clip_feature(truth.clip_id, FRONT_CAMERA)
    ours = load_sample(open_dataset(tmp_path), truth.clip_id, DEFAULT_T0_US)
    times = DEFAULT_T0_US + np.asarray(FRAME_OFFSETS_US)
    images, used = reader.decode_images_from_timestamps(times)
    assert used.tolist() == ours.frame_timestamps_us[1].tolist()
    np.testing.assert_array_equal(images.transpose(0, 3, 1, 2), ours.images[1])
    xyz, _ = truth.pose_at(DEFAULT_T0_US)
    np.testing.assert_allclose(interp(np.array([DEFAULT_T0_US])).pose.translation, xyz, atol=0.01)


def _decode_all(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data)) as c:
        return sum(f.to_ndarray(format="rgb24").shape[0] > 0 for f in c.decode(video=0))


def _decode_in_child(data: bytes, q) -> None:
    q.put(_decode_all(data))


def test_a_forked_worker_decodes_after_the_parent_did():
    """PyAV keeps one swscale context per thread; a forked DataLoader worker inherited the parent's without
    its slice threads and hung on its first frame (PyAV 18.1.1: every time). shared.data.reader drops the
    forking thread's context before each fork."""
    import multiprocessing as mp

    import numpy as np

    import shared.data.reader  # noqa: F401 - registers the fork hook
    from shared.data.synthetic import _encode_mp4

    data = _encode_mp4((np.full((240, 320, 3), 20 * i, np.uint8) for i in range(6)), 320, 240, 10)
    assert _decode_all(data) == 6  # the parent's thread now holds a scaler
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_decode_in_child, args=(data, q))
    p.start()
    p.join(60)
    hung = p.is_alive()
    if hung:
        p.kill()
    assert not hung and p.exitcode == 0 and q.get(timeout=5) == 6
    assert _decode_all(data) == 6  # and the parent still decodes
