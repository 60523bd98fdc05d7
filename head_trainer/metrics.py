"""Trajectory metrics as the release defines them (alpamayo_r1/metrics), XY only.

pred: (B, K, 64, 3) K sampled trajectories per sample; gt: (B, 64, 3); steps are 0.1 s apart.
- minADE: pick the sample k* with the smallest mean L2 over all 64 steps; `min_ade/by_t=h` is the
  mean over the first h/0.1 steps OF THAT SAME k* (chosen on the full horizon).
- ADE: sample index 0 (the release's "highest log-prob" sample is index 0: its logprob is a dummy).
- FDE / minFDE: L2 at the last step (not on the release's main branch; the seed asks for it).
"""

from __future__ import annotations

import torch

HORIZONS_S = (0.5, 1.0, 3.0, 5.0)
DT_S = 0.1


def l2_xy(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(B, K, T, 3), (B, T, 3) -> (B, K, T) per-step XY distance."""
    return (pred[..., :2] - gt[:, None, :, :2]).norm(dim=-1)


def trajectory_metrics(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample metrics, each (B,)."""
    d = l2_xy(pred.double(), gt.double())  # (B, K, T)
    ade_k = d.mean(-1)  # (B, K)
    kstar = ade_k.argmin(-1)  # (B,)
    d_star = d[torch.arange(d.shape[0]), kstar]  # (B, T)
    out = {
        "min_ade": ade_k.min(-1).values,
        "ade": ade_k[:, 0],
        "fde": d[:, 0, -1],
        "min_fde": d[:, :, -1].min(-1).values,
        "ade/by_t=3.0": d[:, 0, : round(3.0 / DT_S)].mean(-1),
    }
    for h in HORIZONS_S:
        out[f"min_ade/by_t={h}"] = d_star[:, : round(h / DT_S)].mean(-1)
    return out


def lateral_error_at(pred: torch.Tensor, gt: torch.Tensor, t_s: float = 6.4) -> torch.Tensor:
    """Signed y error of sample 0 at time t (m): negative when a left curve is under-steered."""
    i = round(t_s / DT_S) - 1
    return pred[:, 0, i, 1] - gt[:, i, 1]


def summarize(per_sample: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().mean()) for k, v in per_sample.items()}
