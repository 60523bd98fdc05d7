"""Reader for a local copy of nvidia/PhysicalAI-Autonomous-Vehicles (plain download tree or hub cache).

    ds = open_dataset("/data/pai")               # features.csv, clip_index.parquet, metadata/, chunk zips
    sample = load_sample(ds, ds.clip_ids()[0], 5_100_000, camera_config="front-masked")
    it = iter_samples(ds, keyframes="turn-onset"); samples = list(it); print(it.report.summary())

File locations come from `features.csv` (`chunk_path` format strings, `clip_files_in_zip` JSON), never
from a hard-coded pattern. Parsing is the devkit's: `EgomotionState` + its interpolator (cubic-spline
position, SLERP rotation) and `SeekVideoReader` (latest frame at or before each requested time).
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from physical_ai_av.egomotion import EgomotionState
from physical_ai_av.video import SeekVideoReader

from shared.data import errors as E
from shared.data.cameras import CameraConfig, resolve_camera_config
from shared.data.curation import (
    CurvatureStats,
    curvature_profile,
    curvature_stats,
    hash_split,
    parse_keyframe_strategy,
    select_keyframes,
    valid_t0_range,
)
from shared.data.errors import ClipDataError, DatasetLayoutError, SkipReport
from shared.sample import DT_S, FRAME_OFFSETS_US, NUM_FUTURE, NUM_HISTORY, Sample

logger = logging.getLogger(__name__)


def _forget_thread_scaler() -> None:
    """Before a fork: drop the forking thread's PyAV swscale context.

    PyAV (18.1.1 on) keeps one SwsContext per thread (`av.video.frame._thread_local`), with its own
    slice-thread pool. A forked child (a DataLoader worker) inherits the forking thread's context but
    not the pool's threads, so its first frame conversion waits for them forever. Dropped here, in
    the parent, where those threads still exist; the next conversion on either side makes a new one."""
    try:
        from av.video import frame
    except ImportError:
        return
    local = getattr(frame, "_thread_local", None)
    if local is not None:
        local.__dict__.pop("reformatter", None)


os.register_at_fork(before=_forget_thread_scaler)

FEATURES_CSV = "features.csv"
CLIP_INDEX = "clip_index.parquet"
FEATURE_PRESENCE = "metadata/feature_presence.parquet"
SENSOR_PRESENCE = "metadata/sensor_presence.parquet"  # legacy (< 26.03)
DATA_COLLECTION = "metadata/data_collection.parquet"
SPLIT_LABELS = "splits/default.parquet"  # optional override of clip_index.split (devkit 0.2.3)
HUB_REPO_DIR = "datasets--nvidia--PhysicalAI-Autonomous-Vehicles"
EGOMOTION = "egomotion"
EGO_COLUMNS = (
    "timestamp",
    "qx",
    "qy",
    "qz",
    "qw",
    "x",
    "y",
    "z",
    "vx",
    "vy",
    "vz",
    "ax",
    "ay",
    "az",
    "curvature",
)
STEP_US = int(round(DT_S * 1e6))
HISTORY_OFFSETS_US = np.arange(-(NUM_HISTORY - 1), 1, dtype=np.int64) * STEP_US  # (16,) -1.5 s .. 0
FUTURE_OFFSETS_US = np.arange(1, NUM_FUTURE + 1, dtype=np.int64) * STEP_US  # (64,) 0.1 s .. 6.4 s


def _resolve_root(root: Path) -> tuple[Path, str | None]:
    """Plain tree -> (root, None); hub cache (repo dir or its parent) -> (snapshot dir, commit)."""
    if (root / FEATURES_CSV).is_file():
        return root, None
    repo = root if (root / "snapshots").is_dir() else root / HUB_REPO_DIR
    snapshots = repo / "snapshots"
    if snapshots.is_dir():
        ref = repo / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip() / FEATURES_CSV).is_file():
            snap = snapshots / ref.read_text().strip()
            return snap, snap.name
        snaps = sorted(d for d in snapshots.iterdir() if (d / FEATURES_CSV).is_file())
        if len(snaps) == 1:
            return snaps[0], snaps[0].name
        if snaps:
            raise DatasetLayoutError(
                snapshots, f"{len(snaps)} snapshots hold features.csv; pass one snapshot directory as root"
            )
    raise DatasetLayoutError(
        root / FEATURES_CSV,
        "missing: root must be a local download of nvidia/PhysicalAI-Autonomous-Vehicles "
        "(snapshot_download(local_dir=...)) or a hub cache holding it; `synth-world OUT` writes a synthetic one",
    )


def _detect_revision(root: Path, hub_revision: str | None) -> str | None:
    """Hub snapshot name, else the commit huggingface_hub records for a local_dir download, else `revision`."""
    if hub_revision:
        return hub_revision
    for path in (root / ".cache/huggingface/download/features.csv.metadata", root / "revision"):
        if path.is_file():
            first = path.read_text().strip().splitlines()
            if first and first[0].strip():
                return first[0].strip()
    return None


def _read_features(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, index_col="feature")
    except Exception as exc:  # noqa: BLE001 - any parse failure is a layout error naming the file
        raise DatasetLayoutError(path, f"cannot be read as the feature manifest ({exc})") from exc
    missing = {"directory", "chunk_path", "clip_files_in_zip"} - set(df.columns)
    if missing:
        raise DatasetLayoutError(path, f"missing columns {sorted(missing)}")
    if EGOMOTION not in df.index:
        raise DatasetLayoutError(path, "no 'egomotion' feature row")
    parsed = {}
    for feature, row in df.iterrows():
        template = row["chunk_path"]
        if not isinstance(template, str) or "{chunk_id" not in template:
            raise DatasetLayoutError(
                path, f"feature {feature!r}: chunk_path {template!r} lacks '{{chunk_id:04d}}'"
            )
        try:
            template.format(chunk_id=0)
        except (KeyError, ValueError, IndexError) as exc:
            raise DatasetLayoutError(
                path, f"feature {feature!r}: bad chunk_path {template!r} ({exc})"
            ) from exc
        raw = row["clip_files_in_zip"]
        if template.endswith(".zip"):
            try:
                members = json.loads(raw)
                assert isinstance(members, dict) and all("{clip_id}" in v for v in members.values())
            except Exception as exc:  # noqa: BLE001
                raise DatasetLayoutError(
                    path,
                    f"feature {feature!r}: clip_files_in_zip {raw!r} is not a JSON object of '{{clip_id}}' templates",
                ) from exc
            need = {"egomotion"} if feature == EGOMOTION else {"video", "frame_timestamps"}
            if (feature == EGOMOTION or row["directory"] == "camera") and not need <= members.keys():
                raise DatasetLayoutError(
                    path, f"feature {feature!r}: clip_files_in_zip lacks aliases {sorted(need)}"
                )
            parsed[feature] = members
        else:
            parsed[feature] = None
    df = df.copy()
    df["clip_files_in_zip"] = pd.Series(parsed)
    return df


def _read_clip_index(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetLayoutError(path, "missing: every download has clip_index.parquet at its root")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001
        raise DatasetLayoutError(path, f"cannot be read as parquet ({exc})") from exc
    if df.index.name != "clip_id" and "clip_id" in df.columns:
        df = df.set_index("clip_id")
    if "chunk" not in df.columns and "chunk_id" in df.columns:
        df = df.rename(columns={"chunk_id": "chunk"})
    if "chunk" not in df.columns:
        raise DatasetLayoutError(path, f"no 'chunk' column (columns: {list(df.columns)})")
    if not pd.api.types.is_integer_dtype(df["chunk"]):
        raise DatasetLayoutError(
            path, f"'chunk' must be int64, got {df['chunk'].dtype} (NaN or misaligned rows?)"
        )
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()][:3].tolist()
        raise DatasetLayoutError(path, f"duplicate clip ids, e.g. {dup}")
    df.index = df.index.astype(str)
    return df


class LocalDataset:
    """A validated local download tree. Build with `open_dataset`."""

    def __init__(self, root: Path, revision: str | None = None):
        self.root = root
        self.revision = revision
        self.features = _read_features(root / FEATURES_CSV)
        self.clip_index = _read_clip_index(root / CLIP_INDEX)
        self.split_labels: pd.Series | None = None
        if (root / SPLIT_LABELS).is_file():
            self.split_labels = pd.read_parquet(root / SPLIT_LABELS)["split"].astype(str)
        elif "split" in self.clip_index.columns:
            self.split_labels = self.clip_index["split"]
        self.feature_presence: pd.DataFrame | None = None
        for rel in (FEATURE_PRESENCE, SENSOR_PRESENCE):
            if (root / rel).is_file():
                self.feature_presence = pd.read_parquet(root / rel).select_dtypes(include=bool)
                break
        self.data_collection = (
            pd.read_parquet(root / DATA_COLLECTION) if (root / DATA_COLLECTION).is_file() else None
        )

    def __repr__(self) -> str:
        return f"LocalDataset({str(self.root)!r}, clips={len(self.clip_index)}, revision={self.revision!r})"

    # ----- index -----
    @property
    def camera_features(self) -> list[str]:
        return [f for f, d in self.features["directory"].items() if d == "camera"]

    def clip_ids(self, *, available: bool = True, valid_only: bool = False) -> list[str]:
        """Clip ids in index order; `available`: only clips whose egomotion chunk zip is on disk."""
        index = self.clip_index
        if valid_only and "clip_is_valid" in index.columns:
            index = index[index["clip_is_valid"].astype(bool)]
        if available:
            present = {c for c in index["chunk"].unique() if self.feature_file(EGOMOTION, int(c)).is_file()}
            index = index[index["chunk"].isin(present)]
        return index.index.tolist()

    def chunk_of(self, clip_id: str) -> int:
        try:
            return int(self.clip_index.at[clip_id, "chunk"])
        except KeyError:
            raise ClipDataError(clip_id, self.root / CLIP_INDEX, E.NOT_IN_INDEX) from None

    def split_of(self, clip_id: str) -> str:
        """`splits/default.parquet` or clip_index `split` when present for this clip, else the hash split."""
        if self.split_labels is not None and clip_id in self.split_labels.index:
            label = self.split_labels.at[clip_id]
            if isinstance(label, str) and label:
                return label
        return hash_split(clip_id)

    # ----- files -----
    def feature_file(self, feature: str, chunk: int) -> Path:
        return self.root / self.features.at[feature, "chunk_path"].format(chunk_id=chunk)

    def member_name(self, clip_id: str, feature: str, alias: str) -> str:
        return self.features.at[feature, "clip_files_in_zip"][alias].format(clip_id=clip_id)

    def read_member(self, clip_id: str, feature: str, alias: str) -> tuple[bytes, str]:
        """Bytes of one clip member and its display path `zip::member`; typed errors otherwise."""
        if feature not in self.features.index:
            raise ClipDataError(
                clip_id, self.root / FEATURES_CSV, E.MISSING_FILE, f"no feature row {feature!r}"
            )
        chunk = self.chunk_of(clip_id)
        path = self.feature_file(feature, chunk)
        member = self.member_name(clip_id, feature, alias)
        where = f"{path}::{member}"
        if not path.is_file():
            self._raise_if_elsewhere(clip_id, feature, member, chunk, where)
            raise ClipDataError(clip_id, path, E.MISSING_FILE, f"chunk {chunk} of {feature} not downloaded")
        try:
            with zipfile.ZipFile(path) as zf:
                if member not in zf.NameToInfo:
                    self._raise_if_elsewhere(clip_id, feature, member, chunk, where)
                    raise ClipDataError(clip_id, where, E.MISSING_MEMBER)
                return zf.read(member), where
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ClipDataError(clip_id, path, E.CORRUPT_ZIP, str(exc)) from exc

    def _raise_if_elsewhere(self, clip_id: str, feature: str, member: str, chunk: int, where: str) -> None:
        """Name a wrong chunk id: look for the member in the other local chunk zips of this feature."""
        for other in sorted(int(c) for c in self.clip_index["chunk"].unique() if int(c) != chunk):
            path = self.feature_file(feature, other)
            if not path.is_file():
                continue
            try:
                with zipfile.ZipFile(path) as zf:
                    found = member in zf.NameToInfo
            except (zipfile.BadZipFile, OSError):
                continue
            if found:
                raise ClipDataError(
                    clip_id,
                    where,
                    E.WRONG_CHUNK,
                    f"clip_index.parquet says chunk {chunk}, member is in chunk {other}",
                )

    def feature_absent(self, clip_id: str, feature: str) -> bool:
        fp = self.feature_presence
        if fp is None or feature not in fp.columns or clip_id not in fp.index:
            return False
        return not bool(fp.at[clip_id, feature])

    # ----- clips -----
    def read_egomotion(self, clip_id: str) -> pd.DataFrame:
        """The clip's egomotion table, validated: 15 columns, strictly increasing int64 µs, finite values."""
        data, where = self.read_member(clip_id, EGOMOTION, "egomotion")
        try:
            df = pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001
            raise ClipDataError(clip_id, where, E.CORRUPT_TABLE, f"unreadable parquet ({exc})") from exc
        missing = [c for c in EGO_COLUMNS if c not in df.columns]
        if missing:
            raise ClipDataError(clip_id, where, E.CORRUPT_TABLE, f"missing columns {missing}")
        if len(df) < 4:
            raise ClipDataError(clip_id, where, E.EGOMOTION_COVERAGE, f"only {len(df)} rows")
        values = df[list(EGO_COLUMNS)].to_numpy(dtype=np.float64)
        bad = [c for c, ok in zip(EGO_COLUMNS, np.isfinite(values).all(axis=0)) if not ok]
        if bad:
            raise ClipDataError(clip_id, where, E.NAN_VALUES, f"non-finite values in {bad}")
        ts = df["timestamp"].to_numpy()
        if np.any(np.diff(ts) <= 0):
            i = int(np.argmax(np.diff(ts) <= 0))
            raise ClipDataError(
                clip_id, where, E.NON_INCREASING_TIMESTAMPS, f"row {i + 1}: {ts[i]} -> {ts[i + 1]}"
            )
        df["timestamp"] = ts.astype(np.int64)
        return df

    def open_clip(self, clip_id: str) -> ClipReader:
        return ClipReader(self, clip_id)


def open_dataset(root: str | Path) -> LocalDataset:
    """Open and validate a local download (plain tree, hub-cache repo dir, or a snapshot dir)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(root, "not a directory")
    data_root, hub_revision = _resolve_root(root)
    return LocalDataset(data_root, _detect_revision(data_root, hub_revision))


class ClipReader:
    """One clip: its egomotion interpolator (read once) and lazily opened camera readers."""

    def __init__(self, ds: LocalDataset, clip_id: str):
        self.ds = ds
        self.clip_id = clip_id
        self.chunk = ds.chunk_of(clip_id)
        self.ego_path = (
            f"{ds.feature_file(EGOMOTION, self.chunk)}::{ds.member_name(clip_id, EGOMOTION, 'egomotion')}"
        )
        df = ds.read_egomotion(clip_id)
        ts = df["timestamp"].to_numpy(copy=True)
        self.interp = EgomotionState.from_egomotion_df(df).create_interpolator(ts)  # devkit Interpolator
        self.window = valid_t0_range(int(ts[0]), int(ts[-1]))  # valid t0 range or None
        self._cameras: dict[str, SeekVideoReader] = {}
        self._profiles: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __enter__(self) -> ClipReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for reader in self._cameras.values():
            reader.close()
        self._cameras.clear()

    # ----- curvature / keyframes -----
    def curvature(self, source: str = "path") -> tuple[np.ndarray, np.ndarray]:
        """t_us (N,), kappa (N,) on the 10 Hz grid over the whole egomotion range."""
        if source not in self._profiles:
            self._profiles[source] = curvature_profile(self.interp, source)
        return self._profiles[source]

    def curvature_stats(self, source: str = "path") -> CurvatureStats:
        if self.window is None:
            raise ClipDataError(self.clip_id, self.ego_path, E.EGOMOTION_COVERAGE, self._range_text())
        return curvature_stats(*self.curvature(source), self.window, source)

    def keyframes(self, strategy: str = "default", source: str = "path") -> list[int]:
        strat = parse_keyframe_strategy(strategy)
        if strat.name != "default" and self.window is None:
            raise ClipDataError(self.clip_id, self.ego_path, E.EGOMOTION_COVERAGE, self._range_text())
        return select_keyframes(strat, *self.curvature(source), self.window)

    def _range_text(self) -> str:
        start, end = (int(t) for t in self.interp.time_range)
        return f"egomotion covers [{start}, {end}] µs; t0 needs 1.6 s before and 6.4 s after"

    # ----- cameras -----
    def camera(self, name: str) -> SeekVideoReader:
        if name in self._cameras:
            return self._cameras[name]
        ds, clip_id = self.ds, self.clip_id
        if name not in ds.features.index:
            raise ClipDataError(clip_id, ds.root / FEATURES_CSV, E.MISSING_FILE, f"no feature row {name!r}")
        if ds.feature_absent(clip_id, name):
            raise ClipDataError(
                clip_id, ds.root / FEATURE_PRESENCE, E.FEATURE_ABSENT, f"{name} marked absent"
            )
        ts_bytes, ts_where = ds.read_member(clip_id, name, "frame_timestamps")
        try:
            ts = pd.read_parquet(io.BytesIO(ts_bytes))["timestamp"].to_numpy().astype(np.int64)
        except Exception as exc:  # noqa: BLE001
            raise ClipDataError(
                clip_id, ts_where, E.CORRUPT_TABLE, f"no readable 'timestamp' column ({exc})"
            ) from exc
        if len(ts) < 2 or np.any(np.diff(ts) <= 0):
            raise ClipDataError(clip_id, ts_where, E.NON_INCREASING_TIMESTAMPS, f"{len(ts)} frame timestamps")
        video, video_where = ds.read_member(clip_id, name, "video")
        try:
            reader = SeekVideoReader(io.BytesIO(video), ts)
        except Exception as exc:  # noqa: BLE001 - PyAV raises many types for bad input
            raise ClipDataError(
                clip_id, video_where, E.CORRUPT_VIDEO, f"{type(exc).__name__}: {exc}"
            ) from exc
        n_frames = int(reader.stream.frames or 0)
        if n_frames and n_frames != len(ts):
            reader.close()
            raise ClipDataError(
                clip_id, video_where, E.FRAME_COUNT_MISMATCH, f"{n_frames} frames vs {len(ts)} timestamps"
            )
        reader.where = video_where  # for error messages
        self._cameras[name] = reader
        return reader

    def frames(self, name: str, times_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Latest frame at or before each time: images (n, 3, H, W) uint8, frame times (n,) int64."""
        reader = self.camera(name)
        ts = reader.timestamps
        if times_us.min() < ts[0] or times_us.max() > ts[-1]:
            raise ClipDataError(
                self.clip_id,
                reader.where,
                E.FRAMES_NOT_COVERED,
                f"frames cover [{ts[0]}, {ts[-1]}] µs, need [{times_us.min()}, {times_us.max()}]",
            )
        try:
            images, used = reader.decode_images_from_timestamps(times_us)
        except Exception as exc:  # noqa: BLE001
            raise ClipDataError(
                self.clip_id, reader.where, E.CORRUPT_VIDEO, f"{type(exc).__name__}: {exc}"
            ) from exc
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), used.astype(np.int64)

    # ----- sample -----
    def ego_local(self, t0_us: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """History (16,3),(16,3,3) and future (64,3),(64,3,3) in the rig frame at t0."""
        if self.window is None or not self.window[0] <= t0_us <= self.window[1]:
            raise ClipDataError(
                self.clip_id, self.ego_path, E.EGOMOTION_COVERAGE, f"t0={t0_us}: {self._range_text()}"
            )
        times = np.concatenate([HISTORY_OFFSETS_US, FUTURE_OFFSETS_US]) + np.int64(t0_us)
        pose = self.interp(times).pose
        xyz, rot = pose.translation, pose.rotation.as_matrix()  # (80,3), (80,3,3)
        r0, p0 = rot[NUM_HISTORY - 1], xyz[NUM_HISTORY - 1]
        xyz_local = (xyz - p0) @ r0  # == R0^T (xyz - p0) per row
        rot_local = np.einsum("ji,njk->nik", r0, rot)  # R0^T R
        h = NUM_HISTORY
        return xyz_local[:h], rot_local[:h], xyz_local[h:], rot_local[h:]

    def sample(
        self,
        t0_us: int,
        camera_config: str | CameraConfig = "full",
        *,
        keyframe_strategy: str = "explicit",
        curvature_source: str = "path",
    ) -> Sample:
        cfg = resolve_camera_config(camera_config)
        t0_us = int(t0_us)
        hist_xyz, hist_rot, fut_xyz, fut_rot = self.ego_local(t0_us)
        times = np.int64(t0_us) + np.asarray(FRAME_OFFSETS_US, dtype=np.int64)  # (4,)
        decoded = {name: self.frames(name, times) for name in cfg.decoded}
        shapes = {name: img.shape for name, (img, _) in decoded.items()}
        if len(set(shapes.values())) > 1:
            raise ClipDataError(self.clip_id, self.ds.root, E.RESOLUTION_MISMATCH, str(shapes))
        ref_img, ref_ts = next(iter(decoded.values()))
        images = np.stack([decoded[c][0] if c in decoded else np.zeros_like(ref_img) for c in cfg.cameras])
        # Masked cameras never get decoded; they stand in at the reference camera's frame times.
        frame_ts = np.stack([decoded[c][1] if c in decoded else ref_ts for c in cfg.cameras])
        meta = {
            "keyframe_strategy": keyframe_strategy,
            "curvature_source": curvature_source,
            "dataset_revision": self.ds.revision,
            "chunk": self.chunk,
        }
        if self.window is not None:
            meta["curvature"] = self.curvature_stats(curvature_source).to_dict()
        return Sample(
            clip_id=self.clip_id,
            t0_us=t0_us,
            images=images,  # (n_cam, 4, 3, H, W) uint8
            camera_names=cfg.cameras,
            camera_indices=np.asarray(cfg.indices, dtype=np.int64),
            frame_timestamps_us=frame_ts,  # (n_cam, 4) int64
            ego_history_xyz=hist_xyz,
            ego_history_rot=hist_rot,
            ego_future_xyz=fut_xyz,
            ego_future_rot=fut_rot,
            camera_config=cfg.spec,
            split=self.ds.split_of(self.clip_id),
            meta=meta,
        )


def load_sample(
    ds: LocalDataset,
    clip_id: str,
    t0_us: int,
    camera_config: str | CameraConfig = "full",
    *,
    curvature_source: str = "path",
) -> Sample:
    """One sample as Alpamayo-R1 sees it; raises `ClipDataError` naming clip, file and reason."""
    with ds.open_clip(clip_id) as clip:
        return clip.sample(t0_us, camera_config, curvature_source=curvature_source)


class SampleIterator(Iterator[Sample]):
    """Iterator over samples of many clips; bad clips land in `.report` (a `SkipReport`) instead of raising."""

    def __init__(
        self,
        ds: LocalDataset,
        clip_ids: Iterable[str] | None,
        keyframes: str,
        camera_config: str | CameraConfig,
        curvature_source: str,
        report: SkipReport | None,
        progress: bool,
    ):
        self.ds = ds
        self.clip_ids = list(ds.clip_ids() if clip_ids is None else clip_ids)
        self.strategy = parse_keyframe_strategy(keyframes)  # validate before any work
        self.camera_config = resolve_camera_config(camera_config)
        if curvature_source not in ("path", "column"):
            raise ValueError(f"curvature_source must be 'path' or 'column', got {curvature_source!r}")
        self.curvature_source = curvature_source
        self.report = report if report is not None else SkipReport()
        self.n_samples = 0
        self._progress = progress
        self._gen = self._run()

    def __next__(self) -> Sample:
        return next(self._gen)

    def _run(self) -> Iterator[Sample]:
        ids = self.clip_ids
        if self._progress:
            from tqdm import tqdm

            ids = tqdm(ids, desc="samples", unit="clip")
        for clip_id in ids:
            try:
                clip = self.ds.open_clip(clip_id)
            except Exception as exc:  # noqa: BLE001 - a batch never dies on one clip
                self._skip(clip_id, exc)
                continue
            with clip:
                try:
                    t0s = clip.keyframes(self.strategy, self.curvature_source)
                    if not t0s:
                        raise ClipDataError(clip_id, clip.ego_path, E.NO_KEYFRAME, self.strategy.spec)
                    for t0 in t0s:
                        sample = clip.sample(
                            t0,
                            self.camera_config,
                            keyframe_strategy=self.strategy.spec,
                            curvature_source=self.curvature_source,
                        )
                        self.n_samples += 1
                        yield sample
                except Exception as exc:  # noqa: BLE001 - the rest of this clip is skipped
                    self._skip(clip_id, exc)

    def _skip(self, clip_id: str, exc: Exception) -> None:
        if not isinstance(exc, ClipDataError):
            logger.warning("clip %s: unexpected %s: %s", clip_id, type(exc).__name__, exc)
            exc = ClipDataError(clip_id, self.ds.root, E.UNEXPECTED, f"{type(exc).__name__}: {exc}")
        self.report.add(exc)


def iter_samples(
    ds: LocalDataset,
    clip_ids: Iterable[str] | None = None,
    keyframes: str = "default",
    camera_config: str | CameraConfig = "full",
    *,
    curvature_source: str = "path",
    report: SkipReport | None = None,
    progress: bool = False,
) -> SampleIterator:
    """Samples for `clip_ids` (default: all available) at the strategy's keyframes; skips bad clips.

    `it = iter_samples(ds, keyframes="stride:2")`, consume it, then `it.report.counts`.
    """
    return SampleIterator(ds, clip_ids, keyframes, camera_config, curvature_source, report, progress)
