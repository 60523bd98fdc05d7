"""Flow matching as the release trains and samples it (alpamayo_r1/diffusion/flow_matching.py).

t = 0 is pure noise, t = 1 is data:  x_t = t x + (1 - t) eps,  target velocity u = x - eps.
Training times: u ~ Beta(1.5, 1), t = 0.999 (1 - u)  (weighted towards the noisy end, as in pi0).
Sampling: Euler from t = 0 to 1, 10 steps by default, on the release's grid: the times are
`torch.linspace(0, 1, n + 1)` and each step is the difference of neighbours (not i/n and 1/n, which
differ from it by an ulp at some steps), so the same noise on the same prefix gives the release's
trajectory bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowMatchingConfig:
    num_inference_steps: int = 10  # Euler steps at sampling time (release default)
    beta_alpha: float = 1.5  # time sampler u ~ Beta(alpha, beta)
    beta_beta: float = 1.0
    beta_scale: float = 0.999  # t = scale * (1 - u), keeps t < 1
    time_sampler: str = "beta"  # "beta" (release) | "uniform"


def sample_time(batch: int, cfg: FlowMatchingConfig, generator: torch.Generator | None = None,
                device=None) -> torch.Tensor:
    """Training times, (B, 1, 1) fp32."""
    if cfg.time_sampler == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif cfg.time_sampler == "beta":
        # Beta(a, b) via two Gamma draws would need a generator-aware Gamma; inverse CDF is exact
        # only for b = 1 (the release), where F(u) = u^a.
        if cfg.beta_beta != 1.0:
            raise ValueError("beta time sampler supports beta_beta == 1 (the release value) only")
        r = torch.rand(batch, generator=generator, device=device)
        u = r ** (1.0 / cfg.beta_alpha)
        t = cfg.beta_scale * (1.0 - u)
    else:
        raise ValueError(f"unknown time_sampler {cfg.time_sampler!r}: use 'beta' or 'uniform'")
    return t.view(batch, 1, 1)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x, noise: (B, 64, 2); t: (B, 1, 1) -> (x_t, target velocity), both (B, 64, 2)."""
    return t * x + (1.0 - t) * noise, x - noise


def euler_time_grid(num_steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_i, dt_i), both (num_steps,) fp32: t = linspace(0, 1, n + 1)[:-1], dt = its differences."""
    grid = torch.linspace(0.0, 1.0, num_steps + 1, device=device)
    return grid[:-1], grid[1:] - grid[:-1]


def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,  # (B, 64, 2) the starting point x at t = 0
    num_steps: int = 10,
) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 to 1 with `num_steps` Euler steps -> (B, 64, 2).

    velocity gets x and t (B, 1, 1); x <- x + dt_i * v as the release does (dt a (B, 1, 1) tensor).
    """
    x = noise
    times, steps = euler_time_grid(num_steps, x.device)
    for i in range(num_steps):
        t = times[i].view(1, 1, 1).expand(x.shape[0], 1, 1)
        dt = steps[i].view(1, 1, 1).expand(x.shape[0], 1, 1)
        x = x + dt * velocity(x, t).to(x.dtype)
    return x
