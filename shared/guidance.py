"""Classifier-free guidance on navigation, as Alpamayo 1.5 samples it (sheet §4).

Per Euler step the expert runs twice at the same (x, t): on the guided prefix (prompt with the route,
length L_g) and on the unguided one (route removed, length L_u = L_g - route span), each with its own
positions p = L + delta + i and mask. The velocities are mixed as

    v = (1 - w) v_unguided + w v_guided,      x <- x + dt v

w = 1 is the release default and means "off": only the guided branch runs, so the result is bitwise
`AlpamayoHead.sample_actions`. w = 0 is purely unguided; the official nav demo uses w = 1.5. The
initial noise is N(0, I) * temperature (1.0 released default, 0.6 in the nav demo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flow_matching import euler_sample
from .head import N_ACTION, KVPrefix


@dataclass(frozen=True)
class GuidanceConfig:
    weight: float = 1.0  # w: 1 = guidance off (release default), 0 = unguided only, 1.5 = official nav demo
    temperature: float = 1.0  # initial-noise scale (release default 1.0; nav demo 0.6)

    def __post_init__(self):
        if not (self.temperature > 0):
            raise ValueError(f"guidance temperature must be > 0, got {self.temperature}")

    @property
    def active(self) -> bool:
        return self.weight != 1.0


def mix(v_unguided: torch.Tensor, v_guided: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - w) v_u + w v_g, both (B, 64, 2)."""
    return (1.0 - weight) * v_unguided + weight * v_guided


@torch.no_grad()
def sample_actions_guided(head, guided: KVPrefix, unguided: KVPrefix | None = None, *,
                          cfg: GuidanceConfig = GuidanceConfig(), num_samples: int = 1,
                          num_steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Guided Euler sampling -> (B, num_samples, 64, 2) normalised actions.

    `head` has `.velocity(x_t, t, prefix)` and `.cfg.diffusion` (an AlpamayoHead). `unguided` is the same
    B samples without the route (needed only when cfg.weight != 1). Noise draws match sample_actions.
    """
    if cfg.active and unguided is None:
        raise ValueError(f"guidance weight {cfg.weight} needs the unguided prefix (a store built with --unguided)")
    rep_g = guided.repeat_interleave(num_samples) if num_samples > 1 else guided
    noise = torch.randn((rep_g.batch_size, N_ACTION, 2), generator=generator, device=rep_g.lengths.device)
    if cfg.temperature != 1.0:
        noise = noise * cfg.temperature
    steps = num_steps or head.cfg.diffusion.num_inference_steps
    if not cfg.active:
        x = euler_sample(lambda x, t: head.velocity(x, t, rep_g), noise, steps)
    else:
        rep_u = unguided.repeat_interleave(num_samples) if num_samples > 1 else unguided
        if rep_u.batch_size != rep_g.batch_size:
            raise ValueError(f"unguided batch {unguided.batch_size} != guided batch {guided.batch_size}")
        x = euler_sample(lambda x, t: mix(head.velocity(x, t, rep_u), head.velocity(x, t, rep_g), cfg.weight),
                         noise, steps)
    return x.view(guided.batch_size, num_samples, N_ACTION, 2)


@torch.no_grad()
def sample_trajectories_guided(head, guided: KVPrefix, unguided: KVPrefix | None, hist_xyz: torch.Tensor,
                               hist_rot: torch.Tensor, **kw) -> torch.Tensor:
    """(B, num_samples, 64, 3) future xyz in the ego frame at t0 (AlpamayoHead.sample_trajectories + guidance)."""
    actions = sample_actions_guided(head, guided, unguided, **kw)
    bsz, n = actions.shape[:2]
    hx = hist_xyz.float().repeat_interleave(n, 0)
    hr = hist_rot.float().repeat_interleave(n, 0)
    xyz, _ = head.action_space.action_to_traj(actions.flatten(0, 1).float(), hx, hr)
    return xyz.view(bsz, n, N_ACTION, 3)
