"""The release's unicycle action space: trajectory <-> (acceleration, curvature), 64 steps at 10 Hz.

`traj_to_action` turns ground-truth poses into the expert's regression target by a chain of
regularised least-squares fits (speed at t0, smoothed heading, speed profile, acceleration,
curvature), each minimising  ||W(Ax - b)||^2 + (lam / dt^(2k)) ||D_k x||^2 + ridge ||x||^2
with D_k the k-th finite difference. It is a smoother, not an inverse: `action_to_traj` integrates
the action back and lands within centimetres on physically consistent paths. Solves run in fp32
by default, as the release does. Normalisation constants are module buffers so they load from
the checkpoint (`action_space.{accel,curvature}_{mean,std}`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class SolverWeights:
    """(lambda, ridge) per fit. Release values: the class defaults of the official
    `UnicycleAccelCurvatureActionSpace.__init__` (action_space/unicycle_accel_curvature.py:39-57), which
    the release config.json repeats; tests/test_action_space.py pins them against a written-out copy."""

    theta_lambda: float = 1e-6
    theta_ridge: float = 1e-8
    v_lambda: float = 1e-6
    v_ridge: float = 1e-4
    a_lambda: float = 1e-4
    a_ridge: float = 1e-4
    kappa_lambda: float = 1e-4
    kappa_ridge: float = 1e-4


# Smoothing order k of each fit (the official `w_smooth{k}=1.0` arguments): heading, speed: 3; accel, curvature: 2.
THETA_ORDER, V_ORDER, A_ORDER, KAPPA_ORDER = 3, 3, 2, 2


def finite_difference(n: int, order: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n - order, n) matrix of the order-th forward difference (k=1: [-1,1]; k=2: [1,-2,1]; ...)."""
    d = torch.eye(n, dtype=dtype, device=device)
    for _ in range(order):
        d = d[1:] - d[:-1]
    return d


def _solve(
    a_mat: torch.Tensor,  # (B, m, n_all) data design over ALL variables (fixed first)
    b_vec: torch.Tensor,  # (B, m)
    n_fixed: int,
    fixed: torch.Tensor | None,  # (B, n_fixed)
    order: int,
    lam: float,
    ridge: float,
    dt: float,
) -> torch.Tensor:
    """Regularised least squares over the free variables, fixed leading values moved to the RHS.

    Returns all variables (B, n_all): fixed values followed by the solution.
    """
    n_all = a_mat.shape[-1]
    dtype, device = a_mat.dtype, a_mat.device
    d = finite_difference(n_all, order, dtype, device) * (lam / dt ** (2 * order)) ** 0.5  # (n_all-k, n_all)
    a_full = torch.cat([a_mat, d.expand(a_mat.shape[0], -1, -1)], dim=1)  # (B, m + n_all - k, n_all)
    b_full = torch.cat([b_vec, b_vec.new_zeros(b_vec.shape[0], d.shape[0])], dim=1)
    if n_fixed:
        b_full = b_full - (a_full[..., :n_fixed] @ fixed.unsqueeze(-1)).squeeze(-1)
    a_free = a_full[..., n_fixed:]  # (B, M, n_free)
    n_free = a_free.shape[-1]
    lhs = a_free.transpose(1, 2) @ a_free + ridge * torch.eye(n_free, dtype=dtype, device=device)
    rhs = (a_free.transpose(1, 2) @ b_full.unsqueeze(-1)).squeeze(-1)
    chol = torch.linalg.cholesky(lhs)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)  # (B, n_free)
    return torch.cat([fixed, x], dim=-1) if n_fixed else x


def yaw_of(rot: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation -> (...) yaw = atan2(R[1,0], R[0,0])."""
    return torch.atan2(rot[..., 1, 0], rot[..., 0, 0])


def unwrap(angle: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """numpy.unwrap along `dim` for torch tensors."""
    d = torch.diff(angle, dim=dim)
    d_mod = torch.remainder(d + torch.pi, 2 * torch.pi) - torch.pi
    d_mod = torch.where((d_mod == -torch.pi) & (d > 0), torch.full_like(d_mod, torch.pi), d_mod)
    correction = torch.cumsum(d_mod - d, dim=dim)
    first = angle.narrow(dim, 0, 1)
    return torch.cat([first, angle.narrow(dim, 1, angle.shape[dim] - 1) + correction], dim=dim)


def _trapezoid_speed_design(theta: torch.Tensor, dt: float) -> torch.Tensor:
    """Design of  v_t u_t + v_{t+1} u_{t+1} = 2 dp_t / dt  (u = heading unit vector).

    theta: (B, n) headings at the n sample times -> (B, 2(n-1), n), rows [x-eqs; y-eqs].
    """
    bsz, n = theta.shape
    eye = torch.eye(n, dtype=theta.dtype, device=theta.device)
    pair = eye[:-1] + eye[1:]  # (n-1, n): picks v_t and v_{t+1}
    ax = pair * torch.cos(theta).unsqueeze(1)  # (B, n-1, n)
    ay = pair * torch.sin(theta).unsqueeze(1)
    return torch.cat([ax, ay], dim=1)


def _dxy_to_rhs(xy: torch.Tensor, dt: float) -> torch.Tensor:
    """(B, n, 2) positions -> (B, 2(n-1)) = [2 dx/dt; 2 dy/dt]."""
    dp = torch.diff(xy, dim=1) * (2.0 / dt)
    return torch.cat([dp[..., 0], dp[..., 1]], dim=1)


class UnicycleAccelCurvature(nn.Module):
    """Action = (acceleration m/s^2, curvature 1/m) per future step, normalised by dataset stats."""

    def __init__(
        self,
        accel_mean: float = 0.02902694707164455,
        accel_std: float = 0.6810426736454882,
        curvature_mean: float = 0.0002692167976330542,
        curvature_std: float = 0.026148280660833106,
        dt: float = 0.1,
        n_waypoints: int = 64,
        weights: SolverWeights = SolverWeights(),
        solve_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.dt = dt
        self.n_waypoints = n_waypoints
        self.weights = weights
        self.solve_dtype = solve_dtype
        # Scalars, saved in the checkpoint as `action_space.*` (the authoritative values).
        self.register_buffer("accel_mean", torch.tensor(accel_mean))
        self.register_buffer("accel_std", torch.tensor(accel_std))
        self.register_buffer("curvature_mean", torch.tensor(curvature_mean))
        self.register_buffer("curvature_std", torch.tensor(curvature_std))

    @property
    def dims(self) -> tuple[int, int]:
        return (self.n_waypoints, 2)

    # -- normalisation -------------------------------------------------------------------------
    def normalize(self, accel: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
        """(..., 64) x2 -> (..., 64, 2) normalised action."""
        a = (accel - self.accel_mean.float()) / self.accel_std.float()
        k = (kappa - self.curvature_mean.float()) / self.curvature_std.float()
        return torch.stack([a, k], dim=-1)

    def denormalize(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = action[..., 0].float() * self.accel_std.float() + self.accel_mean.float()
        k = action[..., 1].float() * self.curvature_std.float() + self.curvature_mean.float()
        return a, k

    # -- fits ----------------------------------------------------------------------------------
    def estimate_v0(self, hist_xyz: torch.Tensor, hist_rot: torch.Tensor) -> torch.Tensor:
        """Speed at t0 from the 16 history poses: (B, 16, 3), (B, 16, 3, 3) -> (B,)."""
        w = self.weights
        theta = unwrap(yaw_of(hist_rot.to(self.solve_dtype)))  # (B, 16)
        a_mat = _trapezoid_speed_design(theta, self.dt)
        b_vec = _dxy_to_rhs(hist_xyz[..., :2].to(self.solve_dtype), self.dt)
        v = _solve(a_mat, b_vec, 0, None, V_ORDER, w.v_lambda, w.v_ridge, self.dt)  # (B, 16)
        return v[:, -1]

    def smooth_theta(self, fut_rot: torch.Tensor) -> torch.Tensor:
        """Smoothed headings theta_0..theta_64 with theta_0 = 0 fixed: (B, 64, 3, 3) -> (B, 65)."""
        w = self.weights
        yaw = yaw_of(fut_rot.to(self.solve_dtype))  # (B, 64), relative to the t0 frame
        yaw = unwrap(torch.cat([torch.zeros_like(yaw[:, :1]), yaw], dim=1))[:, 1:]
        n = yaw.shape[1] + 1
        a_mat = torch.eye(n, dtype=yaw.dtype, device=yaw.device)[1:].expand(yaw.shape[0], -1, -1)
        return _solve(a_mat, yaw, 1, torch.zeros_like(yaw[:, :1]), THETA_ORDER, w.theta_lambda, w.theta_ridge,
                      self.dt)

    def fit_speed(self, fut_xyz: torch.Tensor, theta: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        """Speeds v_0..v_64 along the smoothed headings, v_0 fixed: -> (B, 65)."""
        w = self.weights
        xy = torch.cat([torch.zeros_like(fut_xyz[:, :1, :2]), fut_xyz[..., :2]], dim=1).to(self.solve_dtype)
        a_mat = _trapezoid_speed_design(theta, self.dt)
        b_vec = _dxy_to_rhs(xy, self.dt)
        return _solve(a_mat, b_vec, 1, v0.unsqueeze(-1).to(self.solve_dtype), V_ORDER, w.v_lambda, w.v_ridge,
                      self.dt)

    def fit_accel(self, v: torch.Tensor) -> torch.Tensor:
        """a_t ~ (v_{t+1} - v_t)/dt with 2nd-order smoothing: (B, 65) -> (B, 64)."""
        w = self.weights
        n = v.shape[1] - 1
        a_mat = torch.eye(n, dtype=v.dtype, device=v.device).expand(v.shape[0], -1, -1)
        return _solve(a_mat, torch.diff(v, dim=1) / self.dt, 0, None, A_ORDER, w.a_lambda, w.a_ridge, self.dt)

    def fit_curvature(self, theta: torch.Tensor, v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """s_t kappa_t ~ theta_{t+1} - theta_t, s_t = dt v_t + dt^2/2 a_t: -> (B, 64)."""
        w = self.weights
        s = self.dt * v[:, :-1] + 0.5 * self.dt**2 * a  # (B, 64)
        a_mat = torch.diag_embed(s)
        return _solve(a_mat, torch.diff(theta, dim=1), 0, None, KAPPA_ORDER, w.kappa_lambda, w.kappa_ridge, self.dt)

    @torch.no_grad()
    def traj_to_action(
        self,
        hist_xyz: torch.Tensor,  # (B, 16, 3) ego frame at t0
        hist_rot: torch.Tensor,  # (B, 16, 3, 3)
        fut_xyz: torch.Tensor,  # (B, 64, 3)
        fut_rot: torch.Tensor,  # (B, 64, 3, 3)
    ) -> torch.Tensor:
        """Ground-truth poses -> normalised action (B, 64, 2), fp32."""
        v0 = self.estimate_v0(hist_xyz, hist_rot)
        theta = self.smooth_theta(fut_rot)
        v = self.fit_speed(fut_xyz, theta, v0)
        a = self.fit_accel(v)
        kappa = self.fit_curvature(theta, v, a)
        return self.normalize(a.float(), kappa.float())

    @torch.no_grad()
    def action_to_traj(
        self,
        action: torch.Tensor,  # (B, 64, 2) normalised
        hist_xyz: torch.Tensor,  # (B, 16, 3)
        hist_rot: torch.Tensor,  # (B, 16, 3, 3)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate the unicycle from t0: -> xyz (B, 64, 3), yaw-only rotations (B, 64, 3, 3)."""
        dt = self.dt
        a, kappa = self.denormalize(action)
        a, kappa = a.to(self.solve_dtype), kappa.to(self.solve_dtype)
        v0 = self.estimate_v0(hist_xyz, hist_rot)
        v = torch.cat([v0.unsqueeze(-1), v0.unsqueeze(-1) + dt * torch.cumsum(a, dim=-1)], dim=-1)  # (B, 65)
        dtheta = kappa * v[:, :-1] * dt + kappa * a * (0.5 * dt**2)
        theta = torch.cat([torch.zeros_like(v0.unsqueeze(-1)), torch.cumsum(dtheta, dim=-1)], dim=-1)  # (B, 65)
        vx, vy = v * torch.cos(theta), v * torch.sin(theta)
        x = torch.cumsum(0.5 * dt * (vx[:, :-1] + vx[:, 1:]), dim=-1)
        y = torch.cumsum(0.5 * dt * (vy[:, :-1] + vy[:, 1:]), dim=-1)
        z = hist_xyz[:, -1:, 2].to(x.dtype).expand_as(x)
        xyz = torch.stack([x, y, z], dim=-1).float()
        rot = yaw_rotation(theta[:, 1:]).float()
        return xyz, rot


def yaw_rotation(yaw: torch.Tensor) -> torch.Tensor:
    """(...) yaw -> (..., 3, 3) rotation about z."""
    c, s = torch.cos(yaw), torch.sin(yaw)
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    return torch.stack(
        [torch.stack([c, -s, zero], -1), torch.stack([s, c, zero], -1), torch.stack([zero, zero, one], -1)], -2
    )
