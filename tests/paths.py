"""Physically consistent test trajectories: clothoid curvature, sampled from continuous time.

Heading is the direction of motion at every instant (no Euler-simulator lag), integrated on a
1 ms grid, then sampled at 10 Hz and expressed in the ego frame at t0.
"""

from __future__ import annotations

import numpy as np

DT_FINE = 1e-3


def clothoid_path(
    v_start: float,
    accel: float,
    curve_start_s: float,
    ramp_s: float,
    kappa_peak: float,
    straight_history: bool = True,
    kappa_hist: float = 0.0,
):
    """Return hist_xyz (16,3), hist_rot (16,3,3), fut_xyz (64,3), fut_rot (64,3,3) in float64.

    Time runs from t0-1.5 s to t0+6.4 s. Curvature: `kappa_hist` before `curve_start_s` (time after
    t0), then a linear ramp over `ramp_s` seconds (a clothoid, since speed is smooth) to `kappa_peak`.
    Speed v(t) = v_start + accel * t (clamped to [0.5, 30]).
    """
    t = np.arange(-1.5, 6.4 + DT_FINE / 2, DT_FINE)
    v = np.clip(v_start + accel * (t + 1.5), 0.5, 30.0)
    k0 = 0.0 if straight_history else kappa_hist
    frac = np.clip((t - curve_start_s) / max(ramp_s, 1e-9), 0.0, 1.0)
    kappa = k0 + (kappa_peak - k0) * frac
    omega = kappa * v
    theta = np.concatenate([[0.0], np.cumsum(0.5 * (omega[1:] + omega[:-1]) * DT_FINE)])
    vx, vy = v * np.cos(theta), v * np.sin(theta)
    x = np.concatenate([[0.0], np.cumsum(0.5 * (vx[1:] + vx[:-1]) * DT_FINE)])
    y = np.concatenate([[0.0], np.cumsum(0.5 * (vy[1:] + vy[:-1]) * DT_FINE)])
    idx = np.round((np.arange(-1.5, 6.45, 0.1) + 1.5) / DT_FINE).astype(int)  # 80 samples
    x, y, th = x[idx], y[idx], theta[idx]
    i0 = 15  # t0
    c, s = np.cos(th[i0]), np.sin(th[i0])
    dx, dy = x - x[i0], y - y[i0]
    xl, yl = c * dx + s * dy, -s * dx + c * dy
    yaw = th - th[i0]
    xyz = np.stack([xl, yl, np.zeros_like(xl)], -1)
    rot = np.zeros((len(yaw), 3, 3))
    rot[:, 0, 0] = np.cos(yaw)
    rot[:, 0, 1] = -np.sin(yaw)
    rot[:, 1, 0] = np.sin(yaw)
    rot[:, 1, 1] = np.cos(yaw)
    rot[:, 2, 2] = 1.0
    return xyz[:16], rot[:16], xyz[16:], rot[16:]


def random_paths(n: int, seed: int = 0, max_lat_acc: float = 4.0):
    """n random plausible paths: speeds 0.5-30 m/s, |kappa| v^2 <= max_lat_acc, mixed shapes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        v_start = rng.uniform(0.5, 30.0)
        accel = rng.uniform(-2.0, 2.0)
        t = np.arange(-1.5, 6.4, DT_FINE)
        vmax = np.clip(v_start + accel * (t + 1.5), 0.5, 30.0).max()
        kmax = min(max_lat_acc / vmax**2, 0.2)
        kappa_peak = rng.uniform(-kmax, kmax)
        straight = rng.random() < 0.7
        kappa_hist = 0.0 if straight else rng.uniform(-kmax, kmax)
        out.append(
            clothoid_path(v_start, accel, rng.uniform(0.0, 3.0), rng.uniform(0.5, 3.0), kappa_peak, straight, kappa_hist)
        )
    return out
