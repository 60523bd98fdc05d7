"""Curation: curvature statistics, keyframe (t0) strategies and the train/val split.

Curvature defaults to the path itself, kappa = d(yaw)/ds from the interpolated poses (left positive
by construction in the FLU rig frame), because the sign of the dataset's `curvature` column is not
documented; `source="column"` uses the column (what the seed's `scan_all_curves.py` read).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

from shared.sample import DEFAULT_T0_US

HISTORY_MARGIN_US = 1_600_000  # official margin: t0 - 1.6 s >= egomotion start
FUTURE_MARGIN_US = 6_400_000  # t0 + 6.4 s <= egomotion end
GRID_US = 100_000  # curvature profile and keyframes live on a 10 Hz grid
HALF_STEP_US = 50_000  # central difference half-width for d(yaw)/ds
MIN_SPEED_MPS = 1.0  # below this, kappa is set to 0 (yaw noise / ds -> 0 is meaningless)
STRAIGHT_KAPPA = 0.01  # |kappa| below this everywhere -> direction "straight" (R > 100 m)
TURN_KAPPA = 0.04  # turn-onset: a turn reaches |kappa| >= this (R <= 25 m)
ONSET_KAPPA = 0.005  # turn-onset: the turn starts where |kappa| last was below this
ONSET_LEAD_US = 500_000  # keyframe = onset - 0.5 s (the paper's "decision moment" buffer)
MAX_ONSET_WALKBACK_US = 3_000_000
VAL_BUCKETS = range(90, 100)  # hash split: sha256(clip_id) mod 100 in 90..99 -> val
KEYFRAME_STRATEGIES = ("default", "max-curvature", "stride:<seconds>", "turn-onset")


def valid_t0_range(ego_start_us: int, ego_end_us: int) -> tuple[int, int] | None:
    """[lo, hi] of t0 with official margins on the egomotion range, or None when empty."""
    lo, hi = int(ego_start_us) + HISTORY_MARGIN_US, int(ego_end_us) - FUTURE_MARGIN_US
    return (lo, hi) if lo <= hi else None


def curvature_profile(interp, source: str = "path") -> tuple[np.ndarray, np.ndarray]:
    """Signed curvature on the 10 Hz grid inside the egomotion range.

    interp: devkit `Interpolator[EgomotionState]`. Returns t_us (N,) int64, kappa (N,) float64 [1/m].
    """
    start, end = (int(t) for t in interp.time_range)
    first = -(-(start + HALF_STEP_US) // GRID_US) * GRID_US
    t = np.arange(first, end - HALF_STEP_US + 1, GRID_US, dtype=np.int64)
    if len(t) == 0:
        return t, np.zeros(0)
    if source == "column":
        return t, np.asarray(interp(t).curvature, dtype=np.float64).reshape(-1)
    if source != "path":
        raise ValueError(f"curvature source must be 'path' or 'column', got {source!r}")
    before, after = interp(t - HALF_STEP_US).pose, interp(t + HALF_STEP_US).pose
    dyaw = _yaw(after.rotation.as_matrix()) - _yaw(before.rotation.as_matrix())
    dyaw = (dyaw + np.pi) % (2 * np.pi) - np.pi
    ds = np.linalg.norm((after.translation - before.translation)[:, :2], axis=1)
    moving = ds >= MIN_SPEED_MPS * (2 * HALF_STEP_US / 1e6)
    kappa = np.where(moving, dyaw / np.maximum(ds, 1e-9), 0.0)
    return t, kappa


def _yaw(rot: np.ndarray) -> np.ndarray:
    """Heading of the rig x axis in the ground plane; rot (N,3,3) -> (N,)."""
    return np.arctan2(rot[:, 1, 0], rot[:, 0, 0])


@dataclass
class CurvatureStats:
    """Per-clip curvature summary over the valid t0 window."""

    max_abs_kappa: float  # max |kappa| [1/m]
    mean_abs_kappa: float
    signed_peak_kappa: float  # kappa at the max-|kappa| time; > 0 left, < 0 right
    t_peak_us: int  # clip time of that peak
    direction: str  # left | right | straight (max |kappa| < STRAIGHT_KAPPA)
    window_start_us: int
    window_end_us: int
    source: str  # path | column

    def to_dict(self) -> dict:
        return asdict(self)


def window_mask(t_us: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    return (t_us >= window[0]) & (t_us <= window[1])


def curvature_stats(
    t_us: np.ndarray, kappa: np.ndarray, window: tuple[int, int], source: str = "path"
) -> CurvatureStats:
    """Stats of the profile restricted to `window` (must contain at least one grid point)."""
    mask = window_mask(t_us, window)
    if not mask.any():
        raise ValueError(f"no curvature samples inside window {window}")
    t, k = t_us[mask], kappa[mask]
    i = int(np.argmax(np.abs(k)))
    peak = float(k[i])
    max_abs = abs(peak)
    direction = "straight" if max_abs < STRAIGHT_KAPPA else ("left" if peak > 0 else "right")
    return CurvatureStats(
        max_abs_kappa=max_abs,
        mean_abs_kappa=float(np.mean(np.abs(k))),
        signed_peak_kappa=peak,
        t_peak_us=int(t[i]),
        direction=direction,
        window_start_us=int(window[0]),
        window_end_us=int(window[1]),
        source=source,
    )


@dataclass(frozen=True)
class KeyframeStrategy:
    name: str  # default | max-curvature | stride | turn-onset
    stride_us: int = 0  # only for stride

    @property
    def spec(self) -> str:
        return f"stride:{self.stride_us / 1e6:g}" if self.name == "stride" else self.name


def parse_keyframe_strategy(spec: str | KeyframeStrategy) -> KeyframeStrategy:
    """`default` | `max-curvature` | `stride:<seconds>` | `turn-onset`."""
    if isinstance(spec, KeyframeStrategy):
        return spec
    if spec in ("default", "max-curvature", "turn-onset"):
        return KeyframeStrategy(spec)
    if spec.startswith("stride:"):
        try:
            seconds = float(spec.split(":", 1)[1])
        except ValueError:
            seconds = math.nan
        if not seconds >= 0.1:
            raise ValueError(f"keyframe strategy {spec!r}: stride must be a number of seconds >= 0.1")
        return KeyframeStrategy("stride", int(round(seconds * 1e6)))
    raise ValueError(f"unknown keyframe strategy {spec!r}; use one of {KEYFRAME_STRATEGIES}")


def turn_onsets(t_us: np.ndarray, kappa: np.ndarray) -> list[tuple[int, float]]:
    """(onset time, signed peak kappa) of each turn: a run of |kappa| >= TURN_KAPPA/2 peaking >= TURN_KAPPA.

    The onset is the last grid time before the run where |kappa| <= ONSET_KAPPA (walking back at most
    3 s), i.e. where the clothoid entry leaves zero curvature.
    """
    a = np.abs(kappa)
    above = a >= TURN_KAPPA / 2
    out = []
    i, n = 0, len(a)
    while i < n:
        if not above[i]:
            i += 1
            continue
        j = i
        while j < n and above[j]:
            j += 1
        peak_i = i + int(np.argmax(a[i:j]))
        if a[peak_i] >= TURN_KAPPA:
            k = i
            while k > 0 and a[k - 1] > ONSET_KAPPA and t_us[i] - t_us[k - 1] <= MAX_ONSET_WALKBACK_US:
                k -= 1
            onset = t_us[k - 1] if k > 0 else t_us[k]
            out.append((int(onset), float(kappa[peak_i])))
        i = j
    return out


def select_keyframes(
    strategy: str | KeyframeStrategy, t_us: np.ndarray, kappa: np.ndarray, window: tuple[int, int] | None
) -> list[int]:
    """t0 values (µs) for one clip. `default` always returns 5.1 s (the reader checks coverage)."""
    strat = parse_keyframe_strategy(strategy)
    if strat.name == "default":
        return [DEFAULT_T0_US]
    if window is None:
        return []
    lo, hi = window
    if strat.name == "stride":
        first = -(-lo // GRID_US) * GRID_US
        return list(range(first, hi + 1, strat.stride_us))
    mask = window_mask(t_us, window)
    if strat.name == "max-curvature":
        if not mask.any():
            return []
        idx = np.flatnonzero(mask)
        return [int(t_us[idx[int(np.argmax(np.abs(kappa[idx])))]])]
    # turn-onset
    t0s = [onset - ONSET_LEAD_US for onset, _ in turn_onsets(t_us, kappa)]
    return [t for t in t0s if lo <= t <= hi]


def hash_split(clip_id: str) -> str:
    """Stable split from the clip id alone: sha256 mod 100, 0-89 train, 90-99 val (the seed's rule)."""
    bucket = int(hashlib.sha256(clip_id.encode("utf-8")).hexdigest(), 16) % 100
    return "val" if bucket in VAL_BUCKETS else "train"
