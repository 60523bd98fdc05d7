"""One driving sample as Alpamayo-R1 sees it: the contract between the dataset reader and cache-build.

Everything is in the ego (rig) frame at t0: x forward, y left, z up, metres; the last history pose
is the origin with identity rotation. Time is clip-relative int64 microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Release camera set and the indices the release sorts them by (alpamayo_r1/common/constants.py).
CAMERA_INDEX: dict[str, int] = {
    "camera_cross_left_120fov": 0,
    "camera_front_wide_120fov": 1,
    "camera_cross_right_120fov": 2,
    "camera_rear_left_70fov": 3,
    "camera_rear_right_70fov": 4,
    "camera_rear_tele_30fov": 5,
    "camera_front_tele_30fov": 6,
}
RELEASE_CAMERAS: tuple[str, ...] = (
    "camera_cross_left_120fov",
    "camera_front_wide_120fov",
    "camera_cross_right_120fov",
    "camera_front_tele_30fov",
)
FRONT_CAMERA = "camera_front_wide_120fov"

NUM_HISTORY = 16  # 10 Hz, t0-1.5 s .. t0
NUM_FUTURE = 64  # 10 Hz, t0+0.1 s .. t0+6.4 s
DT_S = 0.1
FRAME_OFFSETS_US: tuple[int, ...] = (-300_000, -200_000, -100_000, 0)  # 4 frames per camera
DEFAULT_T0_US = 5_100_000  # the release's default keyframe, 5.1 s into the clip


@dataclass
class Sample:
    clip_id: str
    t0_us: int
    images: np.ndarray  # (n_cam, n_frames, 3, H, W) uint8; cameras sorted by index, frames oldest->newest
    camera_names: tuple[str, ...]  # (n_cam,) in the same order as `images`
    camera_indices: np.ndarray  # (n_cam,) int64
    frame_timestamps_us: np.ndarray  # (n_cam, n_frames) int64: the actual frame times used
    ego_history_xyz: np.ndarray  # (16, 3) float64
    ego_history_rot: np.ndarray  # (16, 3, 3) float64
    ego_future_xyz: np.ndarray  # (64, 3) float64
    ego_future_rot: np.ndarray  # (64, 3, 3) float64
    camera_config: str = "full"  # full | front-masked | front-only | explicit list "a,b"
    split: str = "train"
    cot: str | None = None  # reasoning text when the dataset has one (given-cot mode)
    meta: dict = field(default_factory=dict)  # curvature statistics, keyframe strategy, dataset revision...

    @property
    def key(self) -> str:
        """Stable identity inside a cache store: one keyframe of a clip under one camera configuration."""
        return f"{self.clip_id}@{self.t0_us}:{self.camera_config}"
