"""traj -> action -> traj on physically consistent paths, and the solver pieces against references."""

import numpy as np
import pytest
import torch
from paths import clothoid_path, random_paths

from shared.action_space import SolverWeights, UnicycleAccelCurvature, finite_difference, unwrap, yaw_rotation

# The release's solver settings, written out from the official source (class defaults of
# UnicycleAccelCurvatureActionSpace, unicycle_accel_curvature.py:39-57; w_smooth orders of
# theta_smooth / dxy_theta_to_v(_without_v0) / _v_to_a / _theta_v_a_to_kappa): (lambda, ridge, order).
RELEASE_FITS = {"theta": (1e-6, 1e-8, 3), "v": (1e-6, 1e-4, 3), "a": (1e-4, 1e-4, 2), "kappa": (1e-4, 1e-4, 2)}
RELEASE_NORM = (0.02902694707164455, 0.6810426736454882, 0.0002692167976330542, 0.026148280660833106)
DT = 0.1


def _stack(paths):
    return [torch.tensor(np.stack([p[i] for p in paths]), dtype=torch.float32) for i in range(4)]


def _paths():
    paths = random_paths(200, seed=3)
    # plus the case the project exists for: straight history, sharp curve right after t0
    paths += [clothoid_path(v, 0.0, 0.2, 1.0, s * 3.9 / v**2, True) for v in (6.0, 10.0, 14.0) for s in (1, -1)]
    return paths


# -- an independent float64 numpy reference of the release's traj_to_action --------------------------
def _diff_matrix(n, k):
    d = np.eye(n)
    for _ in range(k):
        d = d[1:] - d[:-1]
    return d


def _ref_solve(a, b, fit, x_fixed=None):
    """Normal equations as the release builds them: (A^T A + lam/dt^2k D_k^T D_k + ridge I) x = A^T b over the
    free variables; a fixed first variable (x_fixed) moves to the right-hand side, ridge on free ones only."""
    lam, ridge, k = RELEASE_FITS[fit]
    n = a.shape[1]
    d = _diff_matrix(n, k)
    lhs = a.T @ a + lam / DT ** (2 * k) * d.T @ d
    rhs = a.T @ b
    if x_fixed is None:
        return np.linalg.solve(lhs + ridge * np.eye(n), rhs)
    free = np.linalg.solve(lhs[1:, 1:] + ridge * np.eye(n - 1), rhs[1:] - lhs[1:, 0] * x_fixed)
    return np.concatenate([[x_fixed], free])


def _ref_speed(xy, theta, v0=None):
    """Trapezoid: v_t (cos, sin)(theta_t) + v_{t+1} (cos, sin)(theta_{t+1}) = 2 (p_{t+1} - p_t) / dt."""
    n = len(theta)
    a = np.zeros((2 * (n - 1), n))
    for t in range(n - 1):
        a[2 * t, t], a[2 * t, t + 1] = np.cos(theta[t]), np.cos(theta[t + 1])
        a[2 * t + 1, t], a[2 * t + 1, t + 1] = np.sin(theta[t]), np.sin(theta[t + 1])
    b = (2 / DT * np.diff(xy, axis=0)).reshape(-1)  # interleaved x, y rows as above
    return _ref_solve(a, b, "v", v0)


def _yaw(rot):
    return np.arctan2(rot[:, 1, 0], rot[:, 0, 0])


def reference_traj_to_action(hx, hr, fx, fr):
    v0 = _ref_speed(hx[:, :2], np.unwrap(_yaw(hr)))[-1]
    theta = _ref_solve(np.eye(65)[1:], np.unwrap(_yaw(fr)), "theta", 0.0)  # (65,), theta_0 = 0
    xy = np.concatenate([hx[-1:, :2], fx[:, :2]])
    v = _ref_speed(xy, theta, v0)  # (65,)
    a = _ref_solve(np.eye(64), np.diff(v) / DT, "a")
    s = DT * v[:-1] + DT**2 / 2 * a
    kappa = _ref_solve(np.diag(s), np.diff(theta), "kappa")
    am, asd, km, ksd = RELEASE_NORM
    return np.stack([(a - am) / asd, (kappa - km) / ksd], -1)


def test_solver_weights_are_the_release_values():
    w = SolverWeights()
    assert (w.theta_lambda, w.theta_ridge) == RELEASE_FITS["theta"][:2]
    assert (w.v_lambda, w.v_ridge) == RELEASE_FITS["v"][:2]
    assert (w.a_lambda, w.a_ridge) == RELEASE_FITS["a"][:2]
    assert (w.kappa_lambda, w.kappa_ridge) == RELEASE_FITS["kappa"][:2]
    asp = UnicycleAccelCurvature()
    assert tuple(float(b) for b in (asp.accel_mean, asp.accel_std, asp.curvature_mean, asp.curvature_std)) == \
        tuple(float(np.float32(x)) for x in RELEASE_NORM)


@pytest.mark.parametrize("solve_dtype, atol", [(torch.float64, 2e-6), (torch.float32, 5e-3)])
def test_traj_to_action_equals_the_release_fits(solve_dtype, atol):
    """Every fit against the written-out release math (weights, smoothing orders, fixed values, ridge).

    fp64 solves differ from the reference by the fp32 normalisation only; fp32 solves (the release default)
    by their rounding. The mutations this guards against move actions by 0.08 or more."""
    paths = _paths()[::10] + _paths()[-6:]
    asp = UnicycleAccelCurvature(solve_dtype=solve_dtype).double()
    t = [torch.tensor(np.stack([p[i] for p in paths]), dtype=solve_dtype) for i in range(4)]
    ours = asp.traj_to_action(*t).double().numpy()
    ref = np.stack([reference_traj_to_action(*p) for p in paths])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)


def test_round_trip_on_clothoids_meets_release_accuracy():
    """Limits are what the release's fits achieve here in fp32 (median 1.51 mm, p95 5.8 mm, max 26.8 mm)."""
    asp = UnicycleAccelCurvature()
    paths = _paths()
    hx, hr, fx, fr = _stack(paths)
    action = asp.traj_to_action(hx, hr, fx, fr)
    assert action.shape == (len(paths), 64, 2) and action.dtype == torch.float32
    xyz, rot = asp.action_to_traj(action, hx, hr)
    err = (xyz[..., :2] - fx[..., :2]).norm(dim=-1)  # (N, 64) metres
    assert err.median() <= 0.0016, err.median()
    assert err.quantile(0.95) <= 0.0060, err.quantile(0.95)
    assert err.max() <= 0.0272, err.max()
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
