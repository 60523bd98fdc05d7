"""traj -> action -> traj on physically consistent paths, and the solver pieces against references."""

import numpy as np
import pytest
import torch
from paths import clothoid_path, random_paths

from shared.action_space import UnicycleAccelCurvature, finite_difference, unwrap, yaw_rotation


def _stack(paths):
    return [torch.tensor(np.stack([p[i] for p in paths]), dtype=torch.float32) for i in range(4)]


def test_round_trip_on_clothoids_meets_release_accuracy():
    asp = UnicycleAccelCurvature()
    paths = random_paths(200, seed=3)
    # plus the case the project exists for: straight history, sharp curve right after t0
    paths += [clothoid_path(v, 0.0, 0.2, 1.0, s * 3.9 / v**2, True) for v in (6.0, 10.0, 14.0) for s in (1, -1)]
    hx, hr, fx, fr = _stack(paths)
    action = asp.traj_to_action(hx, hr, fx, fr)
    assert action.shape == (len(paths), 64, 2) and action.dtype == torch.float32
    xyz, rot = asp.action_to_traj(action, hx, hr)
    err = (xyz[..., :2] - fx[..., :2]).norm(dim=-1)  # (N, 64) metres
    assert err.median() <= 0.02, err.median()
    assert err.max() <= 0.10, err.max()
    # headings come back too (yaw-only rotations)
    yaw_err = torch.atan2(rot[..., 1, 0], rot[..., 0, 0]) - torch.atan2(fr[..., 1, 0], fr[..., 0, 0])
    assert yaw_err.abs().max() < 0.02


def test_curvature_sign_and_value_on_a_circle():
    """A constant left arc: curvature positive and equal to 1/R after the fit settles."""
    asp = UnicycleAccelCurvature()
    kappa = 0.02
    hx, hr, fx, fr = _stack([clothoid_path(10.0, 0.0, -1.6, 1e-6, kappa, False, kappa)])
    a, k = asp.denormalize(asp.traj_to_action(hx, hr, fx, fr))
    assert torch.allclose(k[0, 5:-5], torch.full((54,), kappa), atol=2e-4)
    assert torch.allclose(a[0, 5:-5], torch.zeros(54), atol=0.02)


def test_v0_estimate_constant_speed():
    asp = UnicycleAccelCurvature()
    hx, hr, _, _ = _stack([clothoid_path(12.5, 0.0, 1.0, 1.0, 0.0)])
    assert asp.estimate_v0(hx, hr).item() == pytest.approx(12.5, abs=1e-3)


def test_normalisation_uses_buffers():
    asp = UnicycleAccelCurvature()
    asp.accel_std.fill_(2.0)
    a = torch.full((1, 64), 2.0 + float(asp.accel_mean))
    act = asp.normalize(a, torch.zeros(1, 64))
    assert torch.allclose(act[..., 0], torch.ones(1, 64))
    assert set(dict(asp.named_buffers())) == {"accel_mean", "accel_std", "curvature_mean", "curvature_std"}


def test_finite_difference_rows():
    assert finite_difference(4, 1).tolist() == [[-1, 1, 0, 0], [0, -1, 1, 0], [0, 0, -1, 1]]
    assert finite_difference(4, 2).tolist() == [[1, -2, 1, 0], [0, 1, -2, 1]]
    assert finite_difference(4, 3).tolist() == [[-1, 3, -3, 1]]


def test_unwrap_matches_numpy():
    rng = np.random.default_rng(0)
    a = np.cumsum(rng.uniform(-2.5, 2.5, size=(3, 50)), axis=1)
    wrapped = np.angle(np.exp(1j * a))
    np.testing.assert_allclose(unwrap(torch.tensor(wrapped)).numpy(), np.unwrap(wrapped), atol=1e-12)


def test_yaw_rotation_is_rotation():
    r = yaw_rotation(torch.tensor([0.3, -1.2]))
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(3).expand(2, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(r), torch.ones(2))
