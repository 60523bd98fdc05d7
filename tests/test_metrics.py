"""Each metric against a hand computation on constructed trajectories (x forward, y left)."""

import math

import pytest
import torch

from head_trainer.metrics import (
    curvature_bin,
    heading_change,
    straight_bias,
    summarize,
    trajectory_metrics,
)
from shared.action_space import yaw_rotation


def _straight_gt(b: int = 1) -> torch.Tensor:
    gt = torch.zeros(b, 64, 3)
    gt[..., 0] = torch.arange(1, 65, dtype=torch.float32)
    return gt


def test_ade_fde_and_the_by_horizon_quirk():
    gt = _straight_gt()
    pred = gt[:, None].repeat(1, 3, 1, 1)
    pred[0, 0, :, 1] = 2.0  # sample 0: constant 2 m lateral offset
    pred[0, 1, :, 1] = 1.0  # sample 1: 1 m -> the best over 6.4 s
    pred[0, 2, :32, 1] = 0.0  # sample 2: perfect for 3.2 s, then 3 m -> mean 1.5
    pred[0, 2, 32:, 1] = 3.0
    m = trajectory_metrics(pred, gt)
    assert m["ade"].item() == 2.0 and m["ade/by_t=3.0"].item() == 2.0 and m["ade/by_t=6.4"].item() == 2.0
    assert m["min_ade"].item() == 1.0
    assert m["fde"].item() == 2.0
    assert m["min_fde"].item() == 1.0  # min over samples at the last step (sample 1: 1 m, sample 2: 3 m)
    # by_t uses the sample chosen on the full horizon (sample 1: 1 m), not the best over the first
    # 3 s (sample 2: 0 m) -- the release's quirk
    for h in (0.5, 1.0, 3.0, 5.0, 6.4):
        assert m[f"min_ade/by_t={h}"].item() == 1.0
    # sample 0 over 0.5 s = 5 steps; a ramp makes the horizon cut visible
    pred[0, 0, :, 1] = torch.arange(64, dtype=torch.float32)  # |dy| = i at step i
    m = trajectory_metrics(pred, gt)
    assert m["ade/by_t=0.5"].item() == pytest.approx((0 + 1 + 2 + 3 + 4) / 5)
    assert m["ade/by_t=5.0"].item() == pytest.approx(sum(range(50)) / 50)


def test_xy_only_and_max_lateral_deviation():
    gt = torch.zeros(2, 64, 3)
    pred = torch.zeros(2, 1, 64, 3)
    pred[..., 0], pred[..., 1], pred[..., 2] = 3.0, 4.0, 100.0
    m = trajectory_metrics(pred, gt)
    assert torch.equal(m["ade"], torch.full((2,), 5.0, dtype=torch.float64))
    pred[0, 0, 10, 1] = -7.5  # the seed's metric: largest |y| of the predicted path
    m = trajectory_metrics(pred, gt)
    assert m["max_lat_dev"].tolist() == [7.5, 4.0] and m["gt_max_lat_dev"].tolist() == [0.0, 0.0]


def _arc(kappa: float, v: float = 10.0, n: int = 64, dt: float = 0.1):
    """A constant-curvature arc from the origin: xyz (n, 3), yaw rotations (n, 3, 3)."""
    s = v * dt * torch.arange(1, n + 1, dtype=torch.float64)
    yaw = kappa * s
    if kappa == 0:
        x, y = s, torch.zeros_like(s)
    else:
        x, y = torch.sin(yaw) / kappa, (1 - torch.cos(yaw)) / kappa
    return torch.stack([x, y, torch.zeros_like(x)], -1), yaw_rotation(yaw)


def test_corner_distance_lateral_error_and_heading():
    gxyz, grot = _arc(0.02)  # left curve, 64 m: 1.28 rad
    sxyz, srot = _arc(0.0)  # straight
    pred = torch.stack([sxyz, gxyz])[None]  # (1, K=2, 64, 3): sample 0 straight, sample 1 exact
    prot = torch.stack([srot, grot])[None]
    m = trajectory_metrics(pred, gxyz[None], prot, grot[None])
    assert m["corner_distance"].item() == pytest.approx(0.0, abs=1e-12)  # min over K: sample 1 is exact
    # only the straight sample: corners of a box translated by d and turned by dyaw, by hand
    m0 = trajectory_metrics(pred[:, :1], gxyz[None], prot[:, :1], grot[None])
    half = torch.tensor([2.0, 1.5, 1.0], dtype=torch.float64)
    corners = torch.tensor([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=torch.float64) * half
    want = torch.stack([((sxyz[t, :, None] + srot[t] @ corners.T) - (gxyz[t, :, None] + grot[t] @ corners.T)).T.norm(dim=-1).mean()
                        for t in range(64)]).mean()
    assert m0["corner_distance"].item() == pytest.approx(want.item(), rel=1e-12)
    # lateral error in the GT pose's frame at 3 s (step 29): the straight sample is to the RIGHT of a left curve
    i = 29
    left = torch.tensor([-math.sin(0.02 * 30), math.cos(0.02 * 30)], dtype=torch.float64)
    assert m0["lat_err@3.0"].item() == pytest.approx(((sxyz[i, :2] - gxyz[i, :2]) @ left).item(), rel=1e-12)
    assert m0["lat_err@3.0"].item() < 0 and m0["lat_err@6.4"].item() < m0["lat_err@3.0"].item()
    assert m0["heading_change_gt"].item() == pytest.approx(0.02 * 64.0)
    assert m0["heading_change_pred"].item() == pytest.approx(0.0, abs=1e-12)
    assert m0["heading_err"].item() == pytest.approx(-1.28)
    assert m["heading_change_pred"].item() == pytest.approx(0.64)  # mean over the K samples


def test_heading_change_unwraps_past_pi():
    yaw = torch.linspace(0.1, 3 * math.pi / 2, 64, dtype=torch.float64)  # a 270 deg left loop
    assert heading_change(yaw_rotation(yaw)).item() == pytest.approx(3 * math.pi / 2)
    assert heading_change(yaw_rotation(-yaw)).item() == pytest.approx(-3 * math.pi / 2)


@pytest.mark.parametrize("kappa,want", [(0.0, "straight"), (0.0099, "straight"), (-0.0099, "straight"),
                                        (0.01, "gentle-left"), (-0.03, "gentle-right"), (0.05, "sharp-left"),
                                        (-0.2, "sharp-right")])
def test_curvature_bins(kappa, want):
    assert curvature_bin(kappa) == want


def test_straight_bias_score_sign_and_summary_groups():
    rows = [
        {"bin": "sharp-left", "heading_change_pred": 1.0, "heading_change_gt": 1.0, "ade": 1.0},  # follows: 1
        {"bin": "sharp-right", "heading_change_pred": 0.0, "heading_change_gt": -1.2, "ade": 3.0},  # straight: 0
        {"bin": "sharp-right", "heading_change_pred": 0.5, "heading_change_gt": -1.0, "ade": 5.0},  # wrong way: -0.5
        {"bin": "gentle-left", "heading_change_pred": 0.1, "heading_change_gt": 0.2, "ade": 2.0},  # half: 0.5
        {"bin": "gentle-left", "heading_change_pred": 9.0, "heading_change_gt": 0.01, "ade": 2.0},  # |turn| < 0.05: out
        {"bin": "straight", "heading_change_pred": 0.3, "heading_change_gt": 0.0, "ade": 0.5},  # never scored
    ]
    assert straight_bias(rows[:3]) == pytest.approx((1 + 0 - 0.5) / 3)
    s = summarize(rows)
    assert s["sharp"]["straight_bias"] == pytest.approx(0.5 / 3) and s["sharp"]["n"] == 3
    assert s["sharp-right"]["straight_bias"] == pytest.approx(-0.25)
    assert s["gentle"]["straight_bias"] == pytest.approx(0.5) and s["gentle"]["n"] == 2
    assert s["curved"]["straight_bias"] == pytest.approx((1 + 0 - 0.5 + 0.5) / 4)
    assert s["straight"]["straight_bias"] is None and s["straight"]["ade"] == 0.5
    assert s["all"]["n"] == 6 and s["all"]["ade"] == pytest.approx(13.5 / 6)
    assert "gentle-right" not in s  # empty groups are omitted
