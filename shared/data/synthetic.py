"""A synthetic world in the exact on-disk format of nvidia/PhysicalAI-Autonomous-Vehicles.

We cannot ship or test on real clips (gated, licence forbids redistribution), so the reader, the
curation tools and the demo run on this instead:

    truths = write_synthetic_world("/tmp/world", n_clips=8, seed=0, width=192, height=108, n_chunks=2)

Each clip is a unicycle driven along a clothoid curvature profile (heading = direction of motion,
integrated at 1 ms), 5-20 m/s, lateral acceleration <= 4 m/s^2, left curvature positive. Videos are a
numpy-rendered flat road whose lane markings follow the ego path, seen by each camera through a
pinhole at its own yaw and field of view. The case this project exists for is `sharp-*`: straight
history, a sharp curve starting 0.2-0.6 s after the default t0 (5.1 s), visible only in the images.

Extra files beside the real layout: `README.md`, `revision`, `synthetic_truth.json` (per-clip kind,
onset, peak curvature). `corrupt_clip` produces each bad-input case for tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pandas as pd
from tqdm import tqdm

from shared.data.curation import hash_split
from shared.sample import CAMERA_INDEX, DEFAULT_T0_US, FRONT_CAMERA, RELEASE_CAMERAS

KINDS = ("straight", "gentle-left", "gentle-right", "sharp-left", "sharp-right")
FIRST_KINDS = ("sharp-left", "straight", "sharp-right", "gentle-left", "gentle-right")  # coverage first
KIND_WEIGHTS = {
    "straight": 0.3,
    "gentle-left": 0.15,
    "gentle-right": 0.15,
    "sharp-left": 0.2,
    "sharp-right": 0.2,
}
# Kind mixes (probabilities in KINDS order). Real driving is straight-dominated: the seed's scan found
# 50 of 500 clips over 0.05 1/m. `curve-rich` is the fine-tuning set a user curates with curve-scan.
MIXES = {
    "default": tuple(KIND_WEIGHTS[k] for k in KINDS),
    "straight-dominated": (0.8, 0.05, 0.05, 0.05, 0.05),
    "curve-rich": (0.2, 0.1, 0.1, 0.3, 0.3),
}
SHARP_KAPPA = (0.07, 0.12)  # |kappa| plateau of sharp curves [1/m]
GENTLE_KAPPA = (0.012, 0.025)
SPEED_RANGE = (5.0, 20.0)  # m/s
MAX_LAT_ACCEL = 4.0  # m/s^2, hard limit checked per clip
LAT_ACCEL_TARGET = 3.8  # speeds are chosen below this
SPEED_WIGGLE = 0.03  # relative sinusoidal speed variation
SHARP_ONSET_AFTER_T0_S = (0.2, 0.6)
FINE_DT_US = 1_000  # integration step
TRUTH_DT_US = 2_000  # stored ground-truth resolution
ROAD_EXTEND_S = 10.0  # road drawn this long before 0 and after the clip end
FEATURE_ZIP_PATHS = {
    "labels": "labels/{f}/{f}.chunk_{{chunk_id:04d}}.zip",
    "camera": "camera/{f}/{f}.chunk_{{chunk_id:04d}}.zip",
}

# Camera rig (yaw left-positive, horizontal FOV), all at the windshield: pinhole stand-ins for f-theta.
CAMERA_GEOMETRY: dict[str, tuple[float, float]] = {
    "camera_cross_left_120fov": (60.0, 120.0),
    "camera_front_wide_120fov": (0.0, 120.0),
    "camera_cross_right_120fov": (-60.0, 120.0),
    "camera_rear_left_70fov": (140.0, 70.0),
    "camera_rear_right_70fov": (-140.0, 70.0),
    "camera_rear_tele_30fov": (180.0, 30.0),
    "camera_front_tele_30fov": (0.0, 30.0),
}
CAMERA_POS = (1.5, 0.0, 1.5)  # x forward, y left, z up in the rig frame [m]

# Road cross-section [m from the centre of the ego lane]: 3 lanes of 3.5 m, shoulders.
LANE_DASH, EDGE_LINE, ROAD_HALF, SHOULDER_HALF, LINE_HALF_WIDTH = 1.75, 5.25, 6.5, 7.5, 0.075
DASH_ON_M, DASH_PERIOD_M = 3.0, 9.0
TEX_RES_M = 0.1
GRASS, ASPHALT, LINE, GRAVEL = 0, 1, 2, 3
MAX_GROUND_DIST_M = 250.0
BARCODE_BITS = 12


@dataclass
class ClipTruth:
    """Ground truth of one synthetic clip (anchor frame: rig pose at t=0, yaw 0)."""

    clip_id: str
    chunk: int
    kind: str  # straight | gentle-left | gentle-right | sharp-left | sharp-right
    onset_us: int | None  # start of the planted curve (clothoid entry), None for straights
    peak_kappa: float  # signed plateau curvature, left positive (0 for straights)
    speed_mps: float  # nominal speed
    split: str
    t_us: np.ndarray  # (N,) int64, 2 ms grid over the extended road
    xyz: np.ndarray  # (N, 3) float64
    yaw: np.ndarray  # (N,) float64, unwrapped
    kappa: np.ndarray  # (N,) float64
    speed: np.ndarray  # (N,) float64
    ego_timestamps_us: np.ndarray  # (M,) int64, rows of the egomotion parquet
    frame_timestamps_us: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> (F,) int64

    def pose_at(self, t_us) -> tuple[np.ndarray, np.ndarray]:
        """xyz (n,3), rotation (n,3,3) at arbitrary times (linear in the 2 ms grid: < 0.1 mm error)."""
        t = np.atleast_1d(np.asarray(t_us, dtype=np.float64))
        xyz = np.stack([np.interp(t, self.t_us, self.xyz[:, i]) for i in range(3)], axis=1)
        return xyz, _yaw_matrix(np.interp(t, self.t_us, self.yaw))

    def local_trajectory(self, t0_us: int, offsets_us) -> tuple[np.ndarray, np.ndarray]:
        """Poses at t0+offsets in the rig frame at t0: xyz (n,3), rot (n,3,3)."""
        p0, r0 = self.pose_at(t0_us)
        xyz, rot = self.pose_at(np.int64(t0_us) + np.asarray(offsets_us, dtype=np.int64))
        return (xyz - p0) @ r0[0], np.einsum("ji,njk->nik", r0[0], rot)

    def to_json(self) -> dict:
        return {
            "clip_id": self.clip_id,
            "chunk": self.chunk,
            "kind": self.kind,
            "onset_us": self.onset_us,
            "peak_kappa": self.peak_kappa,
            "speed_mps": self.speed_mps,
            "split": self.split,
        }


def _yaw_matrix(yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.zeros((len(yaw), 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = c, -s, s, c, 1.0
    return rot


# ----------------------------------------------------------------------------------------------
# Motion
# ----------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    kind: str
    v0: float
    wiggle_period_s: float
    wiggle_phase: float
    knots_s: tuple[float, ...] = ()  # kappa profile knots (piecewise linear = clothoid at ~const speed)
    knots_kappa: tuple[float, ...] = ()
    wobble: float = 0.0  # lane-keeping curvature wobble amplitude for straights
    onset_s: float | None = None
    peak: float = 0.0

    def kappa(self, t_s: np.ndarray) -> np.ndarray:
        if self.knots_s:
            return np.interp(t_s, self.knots_s, self.knots_kappa, left=0.0, right=0.0)
        return self.wobble * np.sin(2 * np.pi * t_s / 7.0 + self.wiggle_phase)

    def speed(self, t_s: np.ndarray) -> np.ndarray:
        return self.v0 * (
            1 + SPEED_WIGGLE * np.sin(2 * np.pi * t_s / self.wiggle_period_s + self.wiggle_phase)
        )

    def accel(self, t_s: np.ndarray) -> np.ndarray:
        w = 2 * np.pi / self.wiggle_period_s
        return self.v0 * SPEED_WIGGLE * w * np.cos(w * t_s + self.wiggle_phase)


def _plan(rng: np.random.Generator, kind: str) -> _Plan:
    period, phase = float(rng.uniform(8, 16)), float(rng.uniform(0, 2 * np.pi))
    lo_v, hi_v = SPEED_RANGE[0] / (1 - SPEED_WIGGLE) + 0.05, SPEED_RANGE[1] / (1 + SPEED_WIGGLE)
    if kind == "straight":
        return _Plan(kind, float(rng.uniform(lo_v, hi_v)), period, phase, wobble=float(rng.uniform(0, 0.001)))
    sign = 1.0 if kind.endswith("left") else -1.0
    t0_s = DEFAULT_T0_US / 1e6
    if kind.startswith("sharp"):
        k = float(rng.uniform(*SHARP_KAPPA))
        v_cap = min(math.sqrt(LAT_ACCEL_TARGET / k) / (1 + SPEED_WIGGLE), hi_v)
        v0 = float(rng.uniform(lo_v, max(lo_v, v_cap)))
        onset = t0_s + float(rng.uniform(*SHARP_ONSET_AFTER_T0_S))
        ramp = float(rng.uniform(0.8, 1.5))
        turn = math.radians(float(rng.uniform(60, 100)))  # total heading change
        hold = max(0.3, turn / (v0 * k) - ramp)
    else:
        k = float(rng.uniform(*GENTLE_KAPPA))
        v_cap = min(math.sqrt(LAT_ACCEL_TARGET / k) / (1 + SPEED_WIGGLE), hi_v)
        v0 = float(rng.uniform(8.0, max(8.0, v_cap)))
        onset = float(rng.uniform(1.0, 9.0))
        ramp, hold = float(rng.uniform(1.5, 3.0)), float(rng.uniform(2.0, 5.0))
    if k * (v0 * (1 + SPEED_WIGGLE)) ** 2 > MAX_LAT_ACCEL:
        raise AssertionError(f"internal: {kind} plan breaks the lateral acceleration limit")
    knots = (onset, onset + ramp, onset + ramp + hold, onset + 2 * ramp + hold)
    return _Plan(kind, v0, period, phase, knots, (0.0, sign * k, sign * k, 0.0), onset_s=onset, peak=sign * k)


def _integrate(plan: _Plan, t_us: np.ndarray) -> dict[str, np.ndarray]:
    """Unicycle: yaw' = v kappa, p' = v (cos yaw, sin yaw); trapezoid at 1 ms; anchored at t=0."""
    t = t_us / 1e6
    v, k = plan.speed(t), plan.kappa(t)
    dt = np.diff(t)
    yaw = np.concatenate([[0.0], np.cumsum(0.5 * (v[1:] * k[1:] + v[:-1] * k[:-1]) * dt)])
    i0 = int(np.searchsorted(t_us, 0))
    yaw -= yaw[i0]
    vx, vy = v * np.cos(yaw), v * np.sin(yaw)
    x = np.concatenate([[0.0], np.cumsum(0.5 * (vx[1:] + vx[:-1]) * dt)])
    y = np.concatenate([[0.0], np.cumsum(0.5 * (vy[1:] + vy[:-1]) * dt)])
    x, y = x - x[i0], y - y[i0]
    return {"t": t, "v": v, "k": k, "yaw": yaw, "x": x, "y": y}


def _egomotion_table(plan: _Plan, path: dict, path_t_us: np.ndarray, ts: np.ndarray) -> pd.DataFrame:
    """The 15-column egomotion parquet (anchor frame; velocity and acceleration in that frame)."""
    yaw = np.interp(ts, path_t_us, path["yaw"])
    t = ts / 1e6
    v, k, a_t = plan.speed(t), plan.kappa(t), plan.accel(t)
    c, s = np.cos(yaw), np.sin(yaw)
    zeros = np.zeros(len(ts))
    return pd.DataFrame(
        {
            "timestamp": ts.astype(np.int64),
            "qx": zeros,
            "qy": zeros,
            "qz": np.sin(yaw / 2),
            "qw": np.cos(yaw / 2),
            "x": np.interp(ts, path_t_us, path["x"]),
            "y": np.interp(ts, path_t_us, path["y"]),
            "z": zeros,
            "vx": v * c,
            "vy": v * s,
            "vz": zeros,
            "ax": a_t * c - v * v * k * s,
            "ay": a_t * s + v * v * k * c,
            "az": zeros,
            "curvature": k,
        }
    )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
@dataclass
class _RoadTexture:
    """Top-down class map of the road around the whole path (TEX_RES_M cells, border = grass)."""

    cls: np.ndarray  # (Ht, Wt) uint8
    x0: float
    y0: float

    @classmethod
    def build(cls_, x: np.ndarray, y: np.ndarray, yaw: np.ndarray, s: np.ndarray, max_kappa: float):
        margin = SHOULDER_HALF + 3.0
        x0, y0 = x.min() - margin, y.min() - margin
        wt = int(math.ceil((x.max() + margin - x0) / TEX_RES_M)) + 1
        ht = int(math.ceil((y.max() + margin - y0) / TEX_RES_M)) + 1
        tex = np.zeros((ht, wt), np.uint8)
        # resample the path so that the outer shoulder is stamped without holes
        step = 0.6 * TEX_RES_M / (1 + SHOULDER_HALF * max_kappa)
        grid = np.arange(s[0], s[-1], step)
        px, py, pyaw = np.interp(grid, s, x), np.interp(grid, s, y), np.interp(grid, s, yaw)
        nx, ny = -np.sin(pyaw), np.cos(pyaw)

        def stamp(offsets: np.ndarray, values: np.ndarray, keep: np.ndarray | None = None):
            wx = px[:, None] + offsets[None, :] * nx[:, None]
            wy = py[:, None] + offsets[None, :] * ny[:, None]
            val = np.broadcast_to(values, wx.shape)
            if keep is not None:
                wx, wy, val = wx[keep], wy[keep], val[keep]
            ix = np.rint((wx - x0) / TEX_RES_M).astype(np.int64)
            iy = np.rint((wy - y0) / TEX_RES_M).astype(np.int64)
            tex[iy.ravel(), ix.ravel()] = np.asarray(val).ravel()

        d = np.arange(-SHOULDER_HALF, SHOULDER_HALF + 1e-9, 0.6 * TEX_RES_M)
        stamp(d, np.where(np.abs(d) <= ROAD_HALF, ASPHALT, GRAVEL).astype(np.uint8)[None, :])
        lw = np.arange(-LINE_HALF_WIDTH, LINE_HALF_WIDTH + 1e-9, 0.04)
        edges = np.concatenate([-EDGE_LINE + lw, EDGE_LINE + lw])
        stamp(edges, np.full((1, len(edges)), LINE, np.uint8))
        dashes = np.concatenate([-LANE_DASH + lw, LANE_DASH + lw])
        on = ((grid % DASH_PERIOD_M) < DASH_ON_M)[:, None] & np.ones((1, len(dashes)), bool)
        stamp(dashes, np.full((1, len(dashes)), LINE, np.uint8), keep=on)
        tex[0, :] = tex[-1, :] = tex[:, 0] = tex[:, -1] = GRASS
        return cls_(tex, float(x0), float(y0))


@dataclass
class _CameraModel:
    """Precomputed per-pixel ground intersections of one camera (flat ground, pinhole)."""

    sky: np.ndarray  # (H, W, 3) uint8 background (sky gradient + haze band)
    ground_idx: np.ndarray  # (G,) flat pixel indices that hit the ground within range
    gx: np.ndarray  # (G,) ground point x in the rig frame
    gy: np.ndarray  # (G,) ground point y in the rig frame
    fog: np.ndarray  # (G,) int64 haze level * 4 (row offset into the fog LUT)

    @classmethod
    def build(cls, name: str, width: int, height: int, sky_rgb: np.ndarray, haze_rgb: np.ndarray):
        yaw_deg, hfov_deg = CAMERA_GEOMETRY[name]
        f = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
        u = np.arange(width) + 0.5 - width / 2
        v = np.arange(height) + 0.5 - height / 2
        uu, vv = np.meshgrid(u, v)
        fwd, left, up = np.ones_like(uu), -uu / f, -vv / f
        c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
        rx, ry = fwd * c - left * s, fwd * s + left * c
        hits = up < -1e-6
        t = np.where(hits, CAMERA_POS[2] / np.where(hits, -up, 1.0), np.inf)
        dist = t * np.hypot(rx, ry)
        ground = hits & (dist < MAX_GROUND_DIST_M)
        # background: sky gradient above the horizon, haze below it (ground beyond range)
        elev = np.clip(up / np.hypot(up, np.hypot(rx, ry)), -1, 1)
        w_sky = np.clip(elev * 3, 0, 1)[..., None]
        bg = np.where(hits[..., None], haze_rgb, haze_rgb * (1 - w_sky) + sky_rgb * w_sky)
        flat = np.flatnonzero(ground.ravel())
        fog = np.rint(np.clip(dist.ravel()[flat] / MAX_GROUND_DIST_M, 0, 1) ** 1.5 * (FOG_LEVELS - 1))
        return cls(
            sky=bg.astype(np.uint8),
            ground_idx=flat,
            gx=CAMERA_POS[0] + (t * rx).ravel()[flat],
            gy=CAMERA_POS[1] + (t * ry).ravel()[flat],
            fog=fog.astype(np.int64) * 4,
        )

    def render(self, tex: _RoadTexture, lut: np.ndarray, x: np.ndarray, y: np.ndarray, yaw: np.ndarray):
        """Frames at B poses: x, y, yaw (B,) -> (B, H, W, 3) uint8. lut: (FOG_LEVELS * 4, 3) uint8."""
        c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
        ht, wt = tex.cls.shape
        inv = 1 / TEX_RES_M
        ix = ((x[:, None] - tex.x0 + c * self.gx - s * self.gy) * inv + 0.5).astype(np.int64)
        iy = ((y[:, None] - tex.y0 + s * self.gx + c * self.gy) * inv + 0.5).astype(np.int64)
        np.clip(ix, 0, wt - 1, out=ix)
        np.clip(iy, 0, ht - 1, out=iy)
        cls = tex.cls.ravel()[iy * wt + ix]  # (B, G)
        imgs = np.repeat(self.sky[None], len(x), axis=0)
        imgs.reshape(len(x), -1, 3)[:, self.ground_idx] = lut[self.fog + cls]
        return imgs


FOG_LEVELS = 32


def _fog_lut(class_rgb: np.ndarray, haze: np.ndarray) -> np.ndarray:
    """(FOG_LEVELS * 4, 3) uint8: row level*4 + class = class colour blended towards haze."""
    w = (np.arange(FOG_LEVELS) / (FOG_LEVELS - 1))[:, None, None]
    return np.rint(class_rgb[None] * (1 - w) + haze[None, None] * w).reshape(-1, 3).astype(np.uint8)


def _draw_barcode(img: np.ndarray, value: int) -> None:
    """Frame index as BARCODE_BITS black/white blocks along the top-left (tests read it back)."""
    b = max(6, img.shape[1] // 40)
    for bit in range(BARCODE_BITS):
        img[:b, bit * b : (bit + 1) * b] = 255 if (value >> bit) & 1 else 0


def read_barcode(image_hwc: np.ndarray) -> int:
    """Inverse of the barcode drawn with `frame_barcode=True`; image (H, W, 3) uint8."""
    b = max(6, image_hwc.shape[1] // 40)
    bits = [
        image_hwc[b // 4 : 3 * b // 4, i * b + b // 4 : i * b + 3 * b // 4].mean() > 127
        for i in range(BARCODE_BITS)
    ]
    return sum(int(bit) << i for i, bit in enumerate(bits))


def _encode_mp4(frames, width: int, height: int, fps: int) -> bytes:
    """CFR H.264 mp4 (PyAV libx264), first pts 0, a keyframe every second."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps
        stream.options = {"preset": "ultrafast", "crf": "20"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _parquet_bytes(df: pd.DataFrame, index: bool = False) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=index)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# World
# ----------------------------------------------------------------------------------------------
def _clip_kind(rng: np.random.Generator, i: int, kinds: Sequence[str] | None, mix: str = "default") -> str:
    if kinds is not None:
        return kinds[i % len(kinds)]
    if i < len(FIRST_KINDS):
        return FIRST_KINDS[i]
    return str(rng.choice(list(KINDS), p=np.array(MIXES[mix])))


def split_of(clip_id: str, val_fraction: float | None) -> str:
    """The seed's hash split (10 % val) or, with `val_fraction`, the same hash with a larger val share
    (small worlds need enough held-out curves)."""
    if val_fraction is None:
        return hash_split(clip_id)
    bucket = int(hashlib.sha256(clip_id.encode("utf-8")).hexdigest(), 16) % 100
    return "val" if bucket >= 100 - round(100 * val_fraction) else "train"


def make_clip(
    seed: int,
    index: int,
    *,
    kind: str | None = None,
    chunk: int = 0,
    duration_s: float = 20.0,
    ego_hz: float = 100.0,
    ego_margin_s: float = 1.0,
    fps: int = 30,
    cameras: Sequence[str] = RELEASE_CAMERAS,
    mix: str = "default",
    val_fraction: float | None = None,
) -> tuple[ClipTruth, _Plan, dict, pd.DataFrame]:
    """Motion and timestamps of clip `index` (deterministic in (seed, index), independent of other clips)."""
    rng = np.random.default_rng([seed, index])
    clip_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    kind = kind or _clip_kind(rng, index, None, mix)
    if kind not in KINDS:
        raise ValueError(f"unknown clip kind {kind!r}; use one of {KINDS}")
    plan = _plan(rng, kind)
    duration_us = int(round(duration_s * 1e6))
    pre = post = int(ROAD_EXTEND_S * 1e6)
    path_t = np.arange(-pre, duration_us + post + 1, FINE_DT_US, dtype=np.int64)
    path = _integrate(plan, path_t)
    period = int(round(1e6 / ego_hz))
    phase = int(rng.integers(0, period))
    margin = int(round(ego_margin_s * 1e6))
    ego_ts = np.arange(-margin + phase, duration_us + margin + 1, period, dtype=np.int64)
    ego = _egomotion_table(plan, path, path_t, ego_ts)
    frame_ts = {}
    for cam in cameras:
        offset = int(rng.integers(0, 20_000))
        n = int((duration_us - offset - 1_000) * fps // 1_000_000) + 1
        jitter = rng.integers(-150, 151, size=n)
        frame_ts[cam] = (offset + np.round(np.arange(n) * 1e6 / fps) + jitter).astype(np.int64)
    keep = slice(None, None, TRUTH_DT_US // FINE_DT_US)
    truth = ClipTruth(
        clip_id=clip_id,
        chunk=chunk,
        kind=kind,
        onset_us=None if plan.onset_s is None else int(round(plan.onset_s * 1e6)),
        peak_kappa=plan.peak,
        speed_mps=plan.v0,
        split=split_of(clip_id, val_fraction),
        t_us=path_t[keep],
        xyz=np.stack([path["x"][keep], path["y"][keep], np.zeros(len(path_t[keep]))], axis=1),
        yaw=path["yaw"][keep],
        kappa=path["k"][keep],
        speed=path["v"][keep],
        ego_timestamps_us=ego_ts,
        frame_timestamps_us=frame_ts,
    )
    return truth, plan, path, ego


def _render_videos(
    truth: ClipTruth,
    plan: _Plan,
    path: dict,
    seed: int,
    width: int,
    height: int,
    fps: int,
    frame_barcode: bool,
    blank: bool = False,
) -> dict[str, bytes]:
    if blank:  # same clips and timestamps, no picture (the control that shows a head reads the images)
        gray = np.full((height, width, 3), 128, np.uint8)
        return {cam: _encode_mp4((gray for _ in ts), width, height, fps) for cam, ts in truth.frame_timestamps_us.items()}
    rng = np.random.default_rng([seed, 7919, int(truth.clip_id[:8], 16)])
    s = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(path["x"]), np.diff(path["y"])))])
    sub = slice(None, None, 10)
    tex = _RoadTexture.build(path["x"][sub], path["y"][sub], path["yaw"][sub], s[sub], abs(plan.peak))
    sky = np.array([110, 160, 225]) + rng.integers(-15, 16, 3)
    haze = np.array([200, 205, 210]) + rng.integers(-10, 11, 3)
    rgb = np.array([[70, 120, 50], [85, 85, 90], [235, 235, 230], [140, 125, 100]], np.float64)
    lut = _fog_lut(np.clip(rgb + rng.integers(-12, 13, (4, 1)), 0, 255), haze.astype(np.float64))
    out = {}
    for cam, ts in truth.frame_timestamps_us.items():
        model = _CameraModel.build(cam, width, height, sky.astype(np.float64), haze.astype(np.float64))
        xyz, _ = truth.pose_at(ts)
        yaw = np.interp(ts, truth.t_us, truth.yaw)

        def frames(model=model, xyz=xyz, yaw=yaw, batch=30):
            for b in range(0, len(xyz), batch):
                imgs = model.render(
                    tex, lut, xyz[b : b + batch, 0], xyz[b : b + batch, 1], yaw[b : b + batch]
                )
                for j, img in enumerate(imgs):
                    if frame_barcode:
                        _draw_barcode(img, b + j)
                    yield img

        out[cam] = _encode_mp4(frames(), width, height, fps)
    return out


def _features_csv() -> pd.DataFrame:
    rows = [
        {
            "feature": "egomotion",
            "directory": "labels",
            "chunk_path": FEATURE_ZIP_PATHS["labels"].format(f="egomotion"),
            "clip_files_in_zip": json.dumps({"egomotion": "{clip_id}.egomotion.parquet"}),
        }
    ]
    for cam in sorted(CAMERA_INDEX, key=CAMERA_INDEX.__getitem__):
        rows.append(
            {
                "feature": cam,
                "directory": "camera",
                "chunk_path": FEATURE_ZIP_PATHS["camera"].format(f=cam),
                "clip_files_in_zip": json.dumps(
                    {
                        "video": f"{{clip_id}}.{cam}.mp4",
                        "frame_timestamps": f"{{clip_id}}.{cam}.timestamps.parquet",
                        "blurred_boxes": f"{{clip_id}}.{cam}.blurred_boxes.parquet",
                    }
                ),
            }
        )
    return pd.DataFrame(rows)


def write_synthetic_world(
    root: str | Path,
    n_clips: int = 8,
    seed: int = 0,
    width: int = 192,
    height: int = 108,
    *,
    n_chunks: int = 1,
    first_chunk: int = 0,
    cameras: Sequence[str] = RELEASE_CAMERAS,
    kinds: Sequence[str] | None = None,
    duration_s: float = 20.0,
    ego_hz: float = 100.0,
    fps: int = 30,
    split_column: bool = True,
    frame_barcode: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    mix: str = "default",
    val_fraction: float | None = None,
    blank: bool = False,
) -> list[ClipTruth]:
    """Write a synthetic download tree under `root` and return the ground truth of every clip.

    `cameras=()` writes egomotion only (fast worlds for curvature tests); `kinds` fixes the clip kinds
    (cycled), otherwise they are drawn from `mix` (MIXES) after one clip of each kind;
    `split_column=False` omits clip_index.split so readers fall back to the hash split;
    `val_fraction` enlarges the val share of the split column; `blank` writes uniform gray videos
    (same clips, egomotion and timestamps as without it).
    """
    root = Path(root)
    if n_clips < 1 or not 1 <= n_chunks <= n_clips:
        raise ValueError(f"need n_clips >= 1 and 1 <= n_chunks <= n_clips, got {n_clips=} {n_chunks=}")
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and >= 16 (yuv420p), got {width}x{height}")
    unknown = [c for c in cameras if c not in CAMERA_GEOMETRY]
    if unknown:
        raise ValueError(f"unknown cameras {unknown}; known: {sorted(CAMERA_GEOMETRY)}")
    if duration_s < 8.0 or ego_hz < 10 or fps < 1:
        raise ValueError("duration_s must be >= 8 (t0 margins), ego_hz >= 10, fps >= 1")
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; use one of {sorted(MIXES)}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    features = _features_csv()
    features.to_csv(root / "features.csv", index=False)
    chunk_paths = dict(zip(features["feature"], features["chunk_path"]))

    truths: list[ClipTruth] = []
    zips: dict[tuple[str, int], zipfile.ZipFile] = {}

    def zip_for(feature: str, chunk: int) -> zipfile.ZipFile:
        if (feature, chunk) not in zips:
            path = root / chunk_paths[feature].format(chunk_id=chunk)
            path.parent.mkdir(parents=True, exist_ok=True)
            zips[(feature, chunk)] = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED)
        return zips[(feature, chunk)]

    empty_boxes = _parquet_bytes(
        pd.DataFrame(
            {
                "frame_index": np.zeros(0, np.int64),
                **{k: np.zeros(0, np.float64) for k in ("x1", "y1", "x2", "y2")},
            }
        )
    )
    try:
        for i in tqdm(range(n_clips), desc="synth-world", unit="clip", disable=not progress):
            chunk = first_chunk + i * n_chunks // n_clips
            kind = kinds[i % len(kinds)] if kinds else None
            truth, plan, path, ego = make_clip(
                seed,
                i,
                kind=kind,
                chunk=chunk,
                duration_s=duration_s,
                ego_hz=ego_hz,
                fps=fps,
                cameras=cameras,
                mix=mix,
                val_fraction=val_fraction,
            )
            cid = truth.clip_id
            zip_for("egomotion", chunk).writestr(f"{cid}.egomotion.parquet", _parquet_bytes(ego))
            if cameras:
                videos = _render_videos(truth, plan, path, seed, width, height, fps, frame_barcode, blank)
                for cam, mp4 in videos.items():
                    zf = zip_for(cam, chunk)
                    zf.writestr(f"{cid}.{cam}.mp4", mp4)
                    ts = pd.DataFrame({"timestamp": truth.frame_timestamps_us[cam]})
                    zf.writestr(f"{cid}.{cam}.timestamps.parquet", _parquet_bytes(ts))
                    zf.writestr(f"{cid}.{cam}.blurred_boxes.parquet", empty_boxes)
            truths.append(truth)
    finally:
        for zf in zips.values():
            zf.close()
    _write_tables(root, truths, cameras, seed, split_column)
    digest = hashlib.sha256(
        json.dumps(
            [
                seed,
                n_clips,
                n_chunks,
                first_chunk,
                width,
                height,
                list(cameras),
                list(kinds or []),
                duration_s,
                ego_hz,
                fps,
                frame_barcode,
                mix,
                val_fraction,
                blank,
            ]
        ).encode()
    ).hexdigest()[:12]
    (root / "revision").write_text(f"synthetic-{digest}\n")
    (root / "README.md").write_text(
        "# Synthetic PhysicalAI-AV world\n\nProcedurally generated by `synth-world` (alpamayo-headtune) in the "
        "on-disk layout of nvidia/PhysicalAI-Autonomous-Vehicles. No real data. Ground truth: "
        "`synthetic_truth.json`.\n"
    )
    (root / "synthetic_truth.json").write_text(json.dumps([t.to_json() for t in truths], indent=1))
    return truths


def _write_tables(root: Path, truths: list[ClipTruth], cameras: Sequence[str], seed: int, split_column: bool):
    ids = pd.Index([t.clip_id for t in truths], name="clip_id")
    index = pd.DataFrame({"chunk": np.array([t.chunk for t in truths], dtype=np.int64)}, index=ids)
    if split_column:
        index["split"] = [t.split for t in truths]
    index["clip_is_valid"] = np.ones(len(truths), dtype=bool)
    index.to_parquet(root / "clip_index.parquet")
    (root / "metadata").mkdir(exist_ok=True)
    presence = {
        cam: np.full(len(truths), cam in cameras)
        for cam in sorted(CAMERA_INDEX, key=CAMERA_INDEX.__getitem__)
    }
    presence["lidar_top_360fov"] = np.zeros(len(truths), bool)
    pd.DataFrame(presence, index=ids).to_parquet(root / "metadata" / "feature_presence.parquet")
    rng = np.random.default_rng([seed, 104729])
    pd.DataFrame(
        {
            "country": rng.choice(["United States", "Germany", "France", "Japan"], len(truths)),
            "month": rng.integers(1, 13, len(truths)).astype(np.int64),
            "hour_of_day": rng.integers(0, 24, len(truths)).astype(np.int64),
            "platform_class": rng.choice(["hyperion_8", "hyperion_8.1"], len(truths)),
        },
        index=ids,
    ).to_parquet(root / "metadata" / "data_collection.parquet")


def load_truth(root: str | Path) -> list[dict]:
    """The per-clip summary written beside a synthetic world (kind, onset_us, peak_kappa, split...)."""
    return json.loads((Path(root) / "synthetic_truth.json").read_text())


# ----------------------------------------------------------------------------------------------
# Corruption (bad-input tests)
# ----------------------------------------------------------------------------------------------
CORRUPTIONS = (
    "missing-camera-member",
    "truncated-mp4",
    "corrupt-mp4",
    "short-egomotion",
    "nan-egomotion",
    "non-increasing-egomotion",
    "non-increasing-frame-timestamps",
    "dropped-frame-timestamp",
    "absent-from-index",
    "wrong-chunk",
)


def _rewrite_zip(path: Path, replace: dict[str, bytes | None]) -> None:
    """Rewrite a stored zip with some members replaced (bytes) or removed (None)."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = replace.get(name, src.read(name)) if name in replace else src.read(name)
            if data is not None:
                dst.writestr(name, data)
    tmp.replace(path)


def corrupt_clip(root: str | Path, clip_id: str, kind: str, camera: str = FRONT_CAMERA) -> Path:
    """Damage one clip of a written world in place; returns the file touched. Kinds: `CORRUPTIONS`."""
    root = Path(root)
    features = pd.read_csv(root / "features.csv", index_col="feature")
    index = pd.read_parquet(root / "clip_index.parquet")
    chunk = int(index.at[clip_id, "chunk"])

    def zpath(feature: str) -> Path:
        return root / features.at[feature, "chunk_path"].format(chunk_id=chunk)

    ego_zip, ego_member = zpath("egomotion"), f"{clip_id}.egomotion.parquet"
    cam_zip, mp4, ts_member = (
        zpath(camera),
        f"{clip_id}.{camera}.mp4",
        f"{clip_id}.{camera}.timestamps.parquet",
    )

    def read(path: Path, member: str) -> bytes:
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)

    if kind == "missing-camera-member":
        _rewrite_zip(cam_zip, {mp4: None})
        return cam_zip
    if kind == "truncated-mp4":
        data = read(cam_zip, mp4)
        _rewrite_zip(cam_zip, {mp4: data[: int(len(data) * 0.4)]})
        return cam_zip
    if kind == "corrupt-mp4":
        data = read(cam_zip, mp4)
        _rewrite_zip(cam_zip, {mp4: np.random.default_rng(0).bytes(len(data))})
        return cam_zip
    if kind in ("short-egomotion", "nan-egomotion", "non-increasing-egomotion"):
        ego = pd.read_parquet(io.BytesIO(read(ego_zip, ego_member)))
        if kind == "short-egomotion":
            ego = ego[ego["timestamp"] <= 9_000_000]  # t0=5.1 s needs 11.5 s
        elif kind == "nan-egomotion":
            ego.loc[500:510, "x"] = np.nan
        else:
            ts = ego["timestamp"].to_numpy().copy()
            ts[700], ts[701] = ts[701], ts[700]
            ego["timestamp"] = ts
        _rewrite_zip(ego_zip, {ego_member: _parquet_bytes(ego)})
        return ego_zip
    if kind in ("non-increasing-frame-timestamps", "dropped-frame-timestamp"):
        vals = pd.read_parquet(io.BytesIO(read(cam_zip, ts_member)))["timestamp"].to_numpy().copy()
        if kind == "dropped-frame-timestamp":
            vals = vals[:-1]  # one timestamp row fewer than video frames
        else:
            vals[100] = vals[99]
        _rewrite_zip(cam_zip, {ts_member: _parquet_bytes(pd.DataFrame({"timestamp": vals}))})
        return cam_zip
    if kind == "absent-from-index":
        index.drop(index=clip_id).to_parquet(root / "clip_index.parquet")
        return root / "clip_index.parquet"
    if kind == "wrong-chunk":
        others = sorted(set(index["chunk"].astype(int)) - {chunk})
        if not others:
            raise ValueError("wrong-chunk needs a world with at least two chunks")
        index.loc[clip_id, "chunk"] = np.int64(others[0])
        index["chunk"] = index["chunk"].astype(np.int64)
        index.to_parquet(root / "clip_index.parquet")
        return root / "clip_index.parquet"
    raise ValueError(f"unknown corruption {kind!r}; use one of {CORRUPTIONS}")
