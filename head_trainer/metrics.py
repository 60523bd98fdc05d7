"""Trajectory metrics: the release's definitions (alpamayo_r1/metrics) plus the curve diagnostics.

One axis convention everywhere: the ego (rig) frame at t0, x forward, y LEFT, z up; curvature and
heading are positive to the left. Steps are 0.1 s apart, 64 of them (6.4 s).

pred_xyz (B, K, 64, 3) K sampled trajectories; pred_rot (B, K, 64, 3, 3); gt_xyz (B, 64, 3);
gt_rot (B, 64, 3, 3). Release metrics (docs/METRICS.md has the formulas and sources):
- `min_ade`: the sample k* with the smallest mean XY L2 over all 64 steps; `min_ade/by_t=h` is the
  mean over the first h/0.1 steps OF THAT SAME k* (the release's quirk: k* is chosen on the full
  horizon, not per horizon).
- `ade`, `ade/by_t=h`: sample index 0 (the release's "highest log-prob" sample: its logprob is a
  dummy of zeros, so argmax is index 0).
- `corner_distance`: 8 corners of a 4.0 x 3.0 x 2.0 m box centred on each pose, rotated with it;
  corner-wise 3-D L2, min over K per step and corner, mean over steps and corners.
- `fde` / `min_fde`: XY L2 at the last step, sample 0 / best sample (unmerged upstream PR).
Curve diagnostics (this tool):
- `max_lat_dev`: max |y| of sample 0 (the seed's "max lateral deviation" of the predicted path:
  ~9.5 m when the real model turns through its benchmark curve, 0.14 m when it goes straight);
  `gt_max_lat_dev` the same for the ground truth.
- `lat_err@h`: signed lateral error of sample 0 at h s, in the GT pose's own frame at that step
  (left of the true position > 0). A left curve that is under-steered gives < 0.
- `heading_change_pred` / `heading_change_gt`: yaw at 6.4 s (rad); `heading_change_pred` is the mean
  over the K samples, `heading_err` = sample 0's yaw at 6.4 s minus the GT's.
- straight-bias score (per curvature bin, `summarize`): mean over curved samples of
  heading_change_pred / heading_change_gt: 1 follows the curve, 0 goes straight, < 0 the wrong way.
"""

from __future__ import annotations

import math

import torch

HORIZONS_S = (0.5, 1.0, 3.0, 5.0, 6.4)
DT_S = 0.1
EGO_LWH = (4.0, 3.0, 2.0)  # release EGO_VEHICLE_LWH (metric_api.py)
LATERAL_AT_S = (3.0, 6.4)
# Curvature bins on the GT future's signed peak curvature (1/m, left > 0). Sharp = the seed's scan
# threshold (radius < 20 m); straight = radius > 100 m.
STRAIGHT_MAX_KAPPA = 0.01
SHARP_MIN_KAPPA = 0.05
BINS = ("straight", "gentle-left", "gentle-right", "sharp-left", "sharp-right")
GROUPS = {"all": BINS, "curved": BINS[1:], "gentle": BINS[1:3], "sharp": BINS[3:], **{b: (b,) for b in BINS}}
MIN_TURN_RAD = 0.05  # curved samples whose GT heading change is below this are left out of the bias score


def curvature_bin(kappa: float) -> str:
    """Signed peak curvature (1/m, left > 0) -> one of BINS."""
    a = abs(kappa)
    if a < STRAIGHT_MAX_KAPPA:
        return "straight"
    side = "left" if kappa > 0 else "right"
    return f"{'sharp' if a >= SHARP_MIN_KAPPA else 'gentle'}-{side}"


def yaw_of(rot: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (...) yaw about z (rad, left > 0)."""
    return torch.atan2(rot[..., 1, 0], rot[..., 0, 0])


def heading_change(rot: torch.Tensor) -> torch.Tensor:
    """(..., T, 3, 3) -> (...) unwrapped yaw at the last step relative to t0 (yaw 0 at t0)."""
    yaw = yaw_of(rot)
    d = torch.diff(yaw, dim=-1, prepend=torch.zeros_like(yaw[..., :1]))
    d = (d + math.pi) % (2 * math.pi) - math.pi  # unwrap step by step
    return d.sum(-1)


def box_corners(xyz: torch.Tensor, rot: torch.Tensor, lwh=EGO_LWH) -> torch.Tensor:
    """(..., 3), (..., 3, 3) -> (..., 8, 3) corners of an L x W x H box centred on each pose."""
    half = torch.tensor(lwh, dtype=xyz.dtype, device=xyz.device) / 2
    signs = torch.tensor([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)],
                         dtype=xyz.dtype, device=xyz.device)  # (8, 3)
    local = signs * half  # (8, 3)
    return xyz[..., None, :] + torch.einsum("...ij,cj->...ci", rot, local)


def trajectory_metrics(pred_xyz: torch.Tensor, gt_xyz: torch.Tensor, pred_rot: torch.Tensor | None = None,
                       gt_rot: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample metrics, each (B,). Rotations are needed for corner distance and heading metrics."""
    pred, gt = pred_xyz.double(), gt_xyz.double()
    B = pred.shape[0]
    d = (pred[..., :2] - gt[:, None, :, :2]).norm(dim=-1)  # (B, K, T)
    ade_k = d.mean(-1)  # (B, K)
    kstar = ade_k.argmin(-1)  # (B,)
    d_star = d[torch.arange(B), kstar]  # (B, T)
    out = {
        "min_ade": ade_k.min(-1).values,
        "ade": ade_k[:, 0],
        "fde": d[:, 0, -1],
        "min_fde": d[:, :, -1].min(-1).values,
        "max_lat_dev": pred[:, 0, :, 1].abs().max(-1).values,
        "gt_max_lat_dev": gt[:, :, 1].abs().max(-1).values,
    }
    for h in HORIZONS_S:
        n = round(h / DT_S)
        out[f"min_ade/by_t={h}"] = d_star[:, :n].mean(-1)
        out[f"ade/by_t={h}"] = d[:, 0, :n].mean(-1)
    if pred_rot is None or gt_rot is None:
        return out
    prot, grot = pred_rot.double(), gt_rot.double()
    cp = box_corners(pred, prot)  # (B, K, T, 8, 3)
    cg = box_corners(gt, grot)  # (B, T, 8, 3)
    out["corner_distance"] = (cp - cg[:, None]).norm(dim=-1).min(dim=1).values.mean(dim=(-1, -2))
    for h in LATERAL_AT_S:
        i = round(h / DT_S) - 1
        left = grot[:, i, :2, 1]  # (B, 2) the GT pose's left axis in the t0 frame
        out[f"lat_err@{h}"] = ((pred[:, 0, i, :2] - gt[:, i, :2]) * left).sum(-1)
    h_pred = heading_change(prot)  # (B, K)
    h_gt = heading_change(grot)  # (B,)
    out["heading_change_pred"] = h_pred.mean(-1)
    out["heading_change_gt"] = h_gt
    out["heading_err"] = h_pred[:, 0] - h_gt
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def straight_bias(rows: list[dict]) -> float | None:
    """Mean of heading_change_pred / heading_change_gt over curved rows (|GT turn| >= MIN_TURN_RAD)."""
    ratios = [r["heading_change_pred"] / r["heading_change_gt"] for r in rows
              if r.get("bin", "straight") != "straight" and "heading_change_gt" in r
              and abs(r["heading_change_gt"]) >= MIN_TURN_RAD]
    return _mean(ratios)


def summarize(per_sample: list[dict]) -> dict:
    """Per-sample metric dicts (each with its 'bin') -> {group: {'n', metric means..., 'straight_bias'}}.

    Groups: all, curved, gentle, sharp and each of BINS. Empty groups are omitted."""
    out = {}
    for group, bins in GROUPS.items():
        rows = [r for r in per_sample if r["bin"] in bins]
        if not rows:
            continue
        names = [k for k in rows[0] if k != "bin"]
        g = {"n": len(rows), **{k: _mean([float(r[k]) for r in rows]) for k in names}}
        g["abs_heading_err"] = _mean([abs(float(r["heading_err"])) for r in rows if "heading_err" in r])
        g["straight_bias"] = straight_bias(rows)
        out[group] = g
    return out
