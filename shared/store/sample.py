"""The sample record that crosses the store: `CachedSample`, thumbnails, and a synthetic sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.sample import NUM_FUTURE, NUM_HISTORY
from shared.store.format import KVSpec


@dataclass
class CachedSample:
    """One cached training sample, as written by cache-build and read back by head-train."""

    key: str  # Sample.key = f"{clip_id}@{t0_us}:{camera_config}"
    k: torch.Tensor  # (layers, kv_heads, L, head_dim), kv dtype; post-RoPE keys of the prefix
    v: torch.Tensor  # (layers, kv_heads, L, head_dim), kv dtype
    prefix_len: int  # L: tokens up to and including <|traj_future_start|>
    rope_delta: int | torch.Tensor  # Qwen3-VL rope_deltas of the sample (a 0-d device tensor until written)
    token_ids: torch.Tensor  # (L,) int64
    hidden: torch.Tensor | None  # (L, hidden_size) kv dtype, last layer; None when not stored
    thumbs: np.ndarray  # (n_cam, h, w, 3) uint8, t0 frame of each camera
    ego_history_xyz: np.ndarray  # (16, 3) float64
    ego_history_rot: np.ndarray  # (16, 3, 3) float64
    ego_future_xyz: np.ndarray  # (64, 3) float64
    ego_future_rot: np.ndarray  # (64, 3, 3) float64
    gt_action: np.ndarray  # (64, 2) float32, normalised (accel, curvature)
    v0: float | None
    clip_id: str
    t0_us: int
    camera_config: str
    split: str
    curvature: dict[str, float]
    reasoning: str
    camera_names: tuple[str, ...]
    layers: tuple[int, ...] | None = None  # which VLM layers k/v hold when read with layers=...; None = all
    # Alpamayo 1.5 (KVSpec.navigation; None in R1 stores). The unguided prefix = k/v[:, :, :r_s] + the suffix.
    camera_ids: tuple[int, ...] | None = None  # (n_cam,) camera indices in prompt order (ascending)
    nav_text: str | None = None  # the route text of the prompt, None = no route
    route_span: tuple[int, int] | None = None  # [r_s, r_e] inclusive: <|route_start|> .. <|route_end|>
    unguided_k: torch.Tensor | None = None  # (layers, kv_heads, L - r_e - 1, head_dim) [KVSpec.unguided]
    unguided_v: torch.Tensor | None = None  # same

    @classmethod
    def from_sample(
        cls,
        sample: Any,  # shared.sample.Sample
        *,
        k: torch.Tensor,
        v: torch.Tensor,
        rope_delta: int | torch.Tensor,
        token_ids: torch.Tensor,
        hidden: torch.Tensor | None,
        gt_action: np.ndarray,
        v0: float | None = None,
        reasoning: str = "",
        curvature: dict[str, float] | None = None,
        thumb_hw: tuple[int, int] = (72, 128),
        thumbs: np.ndarray | None = None,
    ) -> CachedSample:
        """Build from a shared.sample.Sample plus the VLM outputs (thumbnails made here unless given).

        k, v, hidden and rope_delta may stay on the GPU: the writer stages them off the caller's thread."""
        return cls(
            key=sample.key, k=k, v=v, prefix_len=int(k.shape[2]),
            rope_delta=rope_delta if isinstance(rope_delta, torch.Tensor) else int(rope_delta),
            token_ids=token_ids, hidden=hidden,
            thumbs=make_thumbnails(sample.images, thumb_hw) if thumbs is None else thumbs,
            ego_history_xyz=sample.ego_history_xyz, ego_history_rot=sample.ego_history_rot,
            ego_future_xyz=sample.ego_future_xyz, ego_future_rot=sample.ego_future_rot,
            gt_action=np.asarray(gt_action, np.float32), v0=v0, clip_id=sample.clip_id,
            t0_us=int(sample.t0_us), camera_config=sample.camera_config, split=sample.split,
            curvature=dict(curvature if curvature is not None else sample.meta.get("curvature", {})),
            reasoning=reasoning or "", camera_names=tuple(sample.camera_names),
        )


def make_thumbnails(images: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """images (n_cam, n_frames, 3, H, W) uint8 -> (n_cam, h, w, 3) uint8 of the last (t0) frame."""
    x = torch.as_tensor(np.asarray(images)[:, -1]).float()  # (n_cam, 3, H, W)
    y = torch.nn.functional.interpolate(x, size=tuple(hw), mode="area")
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def synthetic_sample(
    seed: int, spec: KVSpec, *, prefix_len: int | None = None, n_cam: int = 2, split: str | None = None,
    outliers: bool = True,
) -> CachedSample:
    """A deterministic fake sample (tests, benches, debug presets): same seed -> same bytes.

    K imitates Qwen3's post-norm keys: per-channel log-normal gains and a few outlier channels per head
    (kv-storage.md §3.1), so quantisation errors measured on it are representative."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    L = int(prefix_len or rng.integers(10, 41))
    shape = (spec.num_layers, spec.num_kv_heads, L, spec.head_dim)
    gain = torch.exp(0.3 * torch.randn(spec.num_layers, spec.num_kv_heads, 1, spec.head_dim, generator=g))
    if outliers:
        n_out = max(1, spec.head_dim // 32)
        idx = torch.randint(0, spec.head_dim, (n_out,), generator=g)
        gain[..., idx] *= 4.0
    k = torch.randn(shape, generator=g) * gain
    tok = torch.exp(0.35 * torch.randn(spec.num_layers, spec.num_kv_heads, L, 1, generator=g))
    v = torch.randn(shape, generator=g) * tok
    hidden = torch.randn(L, spec.hidden_size, generator=g) if spec.store_hidden else None
    clip = f"clip-{seed:05d}"
    t0 = 5_100_000 + 100_000 * (seed % 7)
    kappa = rng.normal(0, 0.02, size=NUM_FUTURE)
    fut = np.zeros((NUM_FUTURE, 3))
    fut[:, 0] = np.arange(1, NUM_FUTURE + 1) * 1.0
    fut[:, 1] = np.cumsum(np.cumsum(kappa)) * 0.5
    yaw = np.cumsum(kappa)
    rot = np.zeros((NUM_FUTURE, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = (
        np.cos(yaw), -np.sin(yaw), np.sin(yaw), np.cos(yaw), 1.0)
    camera_config = ("full", "front-only")[seed % 2]
    return CachedSample(
        key=f"{clip}@{t0}:{camera_config}", k=k.to(spec.torch_dtype), v=v.to(spec.torch_dtype), prefix_len=L,
        rope_delta=-int(rng.integers(0, 3000)),
        token_ids=torch.randint(0, 155_697, (L,), generator=g),
        hidden=None if hidden is None else hidden.to(spec.torch_dtype),
        thumbs=rng.integers(0, 256, (n_cam, *spec.thumb_hw, 3), dtype=np.uint8),
        ego_history_xyz=rng.normal(size=(NUM_HISTORY, 3)), ego_history_rot=rng.normal(size=(NUM_HISTORY, 3, 3)),
        ego_future_xyz=fut, ego_future_rot=rot, gt_action=rng.normal(size=(NUM_FUTURE, 2)).astype(np.float32),
        v0=float(rng.uniform(0, 20)) if seed % 5 else None, clip_id=clip, t0_us=t0,
        camera_config=camera_config, split=split or ("val" if seed % 4 == 0 else "train"),
        curvature={"max_abs": float(np.abs(kappa).max()), "mean": float(kappa.mean())},
        reasoning="" if seed % 3 == 0 else f"Slow down for the cyclist ({seed}).",
        camera_names=tuple(f"camera_{j}" for j in range(n_cam)),
    )
