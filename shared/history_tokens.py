"""Ego-history tokens: Alpamayo-R1's `DeltaTrajectoryTokenizer.encode` for the 48 history slots.

The prompt carries 48 `<|traj_history|>` placeholders; the release overwrites them (masked_scatter,
row-major) with `<i3000 + bin>` ids computed from the 16 past ego positions: per-step xyz deltas,
normalised to [-4, 4] x [-4, 4] x [-10, 10] m and quantised to 1000 bins in float32 with
round-half-to-even (docs/alpamayo-r1-prompt.md §3.1). Rotations are ignored (predict_yaw=False).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_BINS = 1000
XYZ_MIN = (-4.0, -4.0, -10.0)
XYZ_MAX = (4.0, 4.0, 10.0)
NUM_HISTORY_POINTS = 16
NUM_HISTORY_TOKENS = 3 * NUM_HISTORY_POINTS  # 48: (dx, dy, dz) per step, interleaved


def history_token_ids(ego_history_xyz: np.ndarray) -> np.ndarray:
    """(16, 3) ego-frame positions at t0-1.5 s .. t0 -> (48,) int64 bins in [0, 999].

    Deltas start from the origin, so the first is the oldest position itself (usually clipped) and
    the last is -xyz[14]. Add `alpamayo_token_ids(tok)["history_bins_start"]` to get token ids.
    """
    xyz = np.asarray(ego_history_xyz, dtype=np.float32)
    if xyz.shape != (NUM_HISTORY_POINTS, 3):
        raise ValueError(f"ego_history_xyz must be ({NUM_HISTORY_POINTS}, 3), got {xyz.shape}")
    # torch keeps the release's float32 arithmetic and its round-half-to-even (499.5 -> 500 for d = 0).
    pts = torch.cat([torch.zeros(1, 3, dtype=torch.float32), torch.from_numpy(xyz)])  # (17, 3)
    delta = pts[1:] - pts[:-1]  # (16, 3)
    lo = torch.tensor(XYZ_MIN, dtype=torch.float32)
    hi = torch.tensor(XYZ_MAX, dtype=torch.float32)
    unit = (delta - lo) / (hi - lo)
    bins = torch.round(unit * (NUM_BINS - 1)).clamp(0, NUM_BINS - 1).to(torch.int64)
    return bins.reshape(-1).numpy()  # (48,) [dx0, dy0, dz0, dx1, ...]


def fuse_history(
    input_ids: torch.Tensor, bins: np.ndarray | torch.Tensor, hist_start_id: int, placeholder_id: int
) -> torch.Tensor:
    """Return a copy of input_ids (B, T) or (T,) with each row's 48 placeholders set to hist_start_id + bins.

    bins: (48,) shared by all rows, or (B, 48). Fails loudly unless every row has exactly 48 placeholders,
    because a miscount would silently shift every later token's meaning.
    """
    ids = torch.as_tensor(input_ids).clone()
    rows = ids if ids.ndim == 2 else ids.unsqueeze(0)  # view: edits land in ids
    b = torch.as_tensor(np.asarray(bins), dtype=torch.int64)
    b = b.expand(rows.shape[0], -1) if b.ndim == 1 else b
    if b.shape != (rows.shape[0], NUM_HISTORY_TOKENS):
        raise ValueError(
            f"bins must be ({NUM_HISTORY_TOKENS},) or ({rows.shape[0]}, {NUM_HISTORY_TOKENS}), got {tuple(b.shape)}"
        )
    if int(b.min()) < 0 or int(b.max()) >= NUM_BINS:
        raise ValueError(f"history bins must lie in [0, {NUM_BINS - 1}]")
    mask = rows == placeholder_id
    counts = mask.sum(dim=1)
    if not bool((counts == NUM_HISTORY_TOKENS).all()):
        raise ValueError(
            f"expected {NUM_HISTORY_TOKENS} history placeholders per row, found {counts.tolist()}"
        )
    rows[mask] = (b + hist_start_id).to(rows.dtype).reshape(-1)  # row-major, like masked_scatter
    return ids
