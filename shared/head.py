"""The trainable head, exactly as released: expert + action_in_proj + action_out_proj + action_space.

State-dict names and shapes equal the release's non-`vlm.` keys: `expert.*` (a transformers
Qwen3-VL text model without `embed_tokens`), `action_in_proj.*` (Fourier `freqs` buffers
included), `action_out_proj.*`, `action_space.*`.

The expert attends to a per-layer KV prefix (`KVPrefix`): expert layer i concatenates its 64
action tokens' keys/values after VLM layer i's cached ones. Position ids are p_i = L + delta + i on
all three mRoPE rows; the attention mask is always built explicitly (bidirectional action block by
default, as release inference does), never left to the installed transformers' `None` handling.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, Qwen3VLTextConfig, Qwen3VLTextModel

from .action_space import UnicycleAccelCurvature
from .config import HeadConfig
from .flow_matching import euler_sample, interpolate, sample_time
from .kv_quant import dequantize_int8_prefix

N_ACTION = 64  # one expert token per future waypoint


# -- action_in_proj (PerWaypointActionInProjV2) ----------------------------------------------------
class RMSNorm(nn.Module):
    """Normalise in fp32, scale by weight (the release's MLPEncoder norm, eps 1e-5)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class FourierEncoder(nn.Module):
    """sqrt(2) [sin(2 pi f x), cos(2 pi f x)] with log-spaced f in [1, max_freq]; `freqs` (1, dim/2) is saved."""

    def __init__(self, dim: int = 20, max_freq: float = 100.0):
        super().__init__()
        self.out_dim = dim
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), steps=dim // 2)[None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (...) -> (..., dim)
        arg = x[..., None] * self.freqs.float() * (2 * math.pi)
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1) * math.sqrt(2)


class MLPEncoder(nn.Module):
    """trunk = Linear, SiLU, [RMSNorm, Linear, SiLU] * (n-1), RMSNorm, Linear (indices as released)."""

    def __init__(self, in_dim: int, num_enc_layers: int, hidden_size: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_size), nn.SiLU()]
        for i in range(num_enc_layers):
            last = i == num_enc_layers - 1
            layers += [RMSNorm(hidden_size), nn.Linear(hidden_size, out_dim if last else hidden_size)]
            if not last:
                layers.append(nn.SiLU())
        self.trunk = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class ActionInProj(nn.Module):
    """(B, 64, 2) noisy normalised action + (B, 1, 1) flow time -> (B, 64, hidden) expert embeddings."""

    def __init__(self, out_dim: int, action_dim: int = 2, num_enc_layers: int = 2, hidden_size: int = 512,
                 max_freq: float = 100.0, num_fourier_feats: int = 20):
        super().__init__()
        self.sinus = nn.ModuleList(FourierEncoder(num_fourier_feats, max_freq) for _ in range(action_dim))
        self.timestep_fourier_encoder = FourierEncoder(num_fourier_feats, max_freq)
        in_dim = (action_dim + 1) * num_fourier_feats
        self.encoder = MLPEncoder(in_dim, num_enc_layers, hidden_size, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        x, t = x.float(), t.float()  # Fourier features in fp32, as released
        feats = torch.cat([enc(x[:, :, i]) for i, enc in enumerate(self.sinus)], dim=-1)  # (B, 64, 40)
        tfeat = self.timestep_fourier_encoder(t.reshape(bsz, -1)[:, -1:])  # (B, 1, 20)
        feats = torch.cat([feats, tfeat.expand(bsz, n, -1)], dim=-1)  # (B, 64, 60)
        feats = feats.to(self.encoder.trunk[0].weight.dtype)
        return self.norm(self.encoder(feats))


# -- the KV prefix the expert attends to -----------------------------------------------------------
@dataclass
class KVPrefix:
    """A batch of cached VLM prefixes, right-padded to a common length.

    keys/values: one (B, kv_heads, L_max, head_dim) tensor per layer (post-RoPE K, raw V);
    lengths: (B,) true prefix lengths L (through `<|traj_future_start|>`);
    rope_deltas: (B,) Qwen3-VL mRoPE deltas of each sample;
    key_scales/value_scales: None, or the store's int8 codes in keys/values with one fp32 scale per key
    channel (B, kv_heads, head_dim) and per value token (B, kv_heads, L_max) a layer: the values are
    codes x scale (shared/kv_quant.py), read in place by the split attention (shared/prefix_attention.py).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor
    rope_deltas: torch.Tensor
    key_scales: list[torch.Tensor] | None = None
    value_scales: list[torch.Tensor] | None = None

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def to(self, device=None, dtype=None) -> KVPrefix:
        """On `device`; K/V in `dtype` (int8 codes are dequantised first, so the result is plain)."""
        if self.quantized and dtype is not None:
            return self.dequantized(dtype).to(device)
        return KVPrefix(
            [k.to(device=device, dtype=dtype) for k in self.keys],
            [v.to(device=device, dtype=dtype) for v in self.values],
            self.lengths.to(device),
            self.rope_deltas.to(device),
            *self._scales_each(lambda t: t.to(device)),
        )

    def _scales_each(self, fn) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """fn of every key / value scale (None, None for a plain prefix)."""
        if not self.quantized:
            return None, None
        return [fn(t) for t in self.key_scales], [fn(t) for t in self.value_scales]

    def dequantized(self, dtype: torch.dtype) -> KVPrefix:
        """int8 codes x scales in fp32, then one cast (kv_quant.dequantize_int8_prefix); a plain prefix as it is."""
        if not self.quantized:
            return self
        kv = [dequantize_int8_prefix(*x, dtype) for x in zip(self.keys, self.values, self.key_scales, self.value_scales)]
        return KVPrefix([k for k, _ in kv], [v for _, v in kv], self.lengths, self.rope_deltas)

    def repeat_interleave(self, n: int) -> KVPrefix:
        """Each sample n times (for several trajectory samples per prefix)."""
        return KVPrefix(
            [k.repeat_interleave(n, 0) for k in self.keys],
            [v.repeat_interleave(n, 0) for v in self.values],
            self.lengths.repeat_interleave(n, 0),
            self.rope_deltas.repeat_interleave(n, 0),
            *self._scales_each(lambda t: t.repeat_interleave(n, 0)),
        )

    @classmethod
    def collate(cls, items: list[tuple[torch.Tensor, torch.Tensor, int, int]]) -> KVPrefix:
        """[(k (layers, kv_heads, L, D), v (same), L, rope_delta)] -> right-padded batch."""
        lmax = max(int(it[2]) for it in items)
        n_layers = items[0][0].shape[0]

        def pad(t: torch.Tensor) -> torch.Tensor:  # (layers, H, L, D) -> (layers, H, Lmax, D)
            return nn.functional.pad(t, (0, 0, 0, lmax - t.shape[2]))

        ks = torch.stack([pad(it[0]) for it in items], dim=1)  # (layers, B, H, Lmax, D)
        vs = torch.stack([pad(it[1]) for it in items], dim=1)
        return cls(
            [ks[i] for i in range(n_layers)],
            [vs[i] for i in range(n_layers)],
            torch.tensor([int(it[2]) for it in items], dtype=torch.long),
            torch.tensor([int(it[3]) for it in items], dtype=torch.long),
        )


def expert_position_ids(prefix: KVPrefix, n_action: int = N_ACTION) -> torch.Tensor:
    """(3, B, 64): p_i = L + rope_delta + i on all three mRoPE rows (equal rows = plain 1-D RoPE)."""
    base = (prefix.lengths + prefix.rope_deltas).view(-1, 1)  # (B, 1)
    pos = base + torch.arange(n_action, device=base.device).view(1, -1)
    return pos.unsqueeze(0).expand(3, -1, -1)


def expert_attention_mask(prefix: KVPrefix, dtype: torch.dtype, n_action: int = N_ACTION,
                          causal: bool = False) -> torch.Tensor:
    """Additive mask (B, 1, 64, L_max + 64): 0 = attend, finfo.min = blocked.

    Blocked: padded prefix columns [L, L_max). Action block: all-see-all (release inference), or
    lower-triangular when `causal` (what the official Stage-2 script trains under transformers 4.57).
    """
    device = prefix.lengths.device
    bsz, lmax = prefix.batch_size, prefix.max_len
    cols = torch.arange(lmax, device=device).view(1, -1)
    keep_prefix = cols < prefix.lengths.view(-1, 1)  # (B, Lmax)
    keep_prefix = keep_prefix.view(bsz, 1, 1, lmax).expand(bsz, 1, n_action, lmax)
    keep_action = torch.ones(n_action, n_action, dtype=torch.bool, device=device)
    if causal:
        keep_action = torch.tril(keep_action)
    keep_action = keep_action.view(1, 1, n_action, n_action).expand(bsz, 1, n_action, n_action)
    keep = torch.cat([keep_prefix, keep_action], dim=-1)
    mask = torch.zeros(keep.shape, dtype=dtype, device=device)
    return mask.masked_fill(~keep, torch.finfo(dtype).min)


def build_expert(expert_cfg: dict, attn_implementation: str = "sdpa") -> Qwen3VLTextModel:
    """transformers' Qwen3-VL text model from the (overridden) text config, without embeddings.

    The config class writes into nested dicts it is given (rope_theta into rope_scaling), so it gets a
    copy: building a head never changes the HeadConfig (and its hash) it was built from."""
    kw = {k: v for k, v in expert_cfg.items() if k not in ("model_type", "transformers_version")}
    cfg = Qwen3VLTextConfig(**copy.deepcopy(kw))
    cfg._attn_implementation = attn_implementation
    expert = Qwen3VLTextModel(cfg)
    del expert.embed_tokens  # inputs are always inputs_embeds; the release saves no expert.embed_tokens
    return expert


def build_action_space(cfg: HeadConfig) -> UnicycleAccelCurvature:
    """The action space with the config's constants (a checkpoint's buffers are loaded over them)."""
    asp = cfg.action_space
    return UnicycleAccelCurvature(asp["accel_mean"], asp["accel_std"], asp["curvature_mean"], asp["curvature_std"],
                                  asp["dt"], int(asp["n_waypoints"]), cfg.solver)


_CACHE_KW = "cache" if "cache" in inspect.signature(Qwen3VLTextModel.forward).parameters else "past_key_values"


class AlpamayoHead(nn.Module):
    """The part of Alpamayo-R1 this tool trains (~2.28 B parameters at release size)."""

    def __init__(self, cfg: HeadConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.expert = build_expert(cfg.expert, attn_implementation)
        hidden = int(cfg.expert["hidden_size"])
        aip = cfg.action_in_proj
        self.action_in_proj = ActionInProj(
            hidden, 2, int(aip["num_enc_layers"]), int(aip["hidden_size"]), float(aip["max_freq"]),
            int(aip["num_fourier_feats"]),
        )
        self.action_out_proj = nn.Linear(hidden, 2)
        self.action_space = build_action_space(cfg)
        self.causal = not cfg.expert_non_causal_attention

    @property
    def dtype(self) -> torch.dtype:
        return self.action_out_proj.weight.dtype

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, prefix: KVPrefix) -> torch.Tensor:
        """Predicted flow velocity in normalised action space.

        x_t: (B, 64, 2) noisy action; t: (B, 1, 1) flow time; prefix: B cached prefixes -> (B, 64, 2).
        """
        emb = self.action_in_proj(x_t, t)  # (B, 64, hidden)
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
            cache.update(k.to(emb.dtype), v.to(emb.dtype), i)  # (B, kv_heads, Lmax, D)
        out = self.expert(
            inputs_embeds=emb,
            position_ids=expert_position_ids(prefix, emb.shape[1]),
            attention_mask=expert_attention_mask(prefix, emb.dtype, emb.shape[1], self.causal),
            use_cache=True,
            **{_CACHE_KW: cache},
        )
        return self.action_out_proj(out.last_hidden_state[:, -emb.shape[1]:]).float()  # (B, 64, 2)

    def flow_matching_loss(self, action: torch.Tensor, prefix: KVPrefix,
                           generator: torch.Generator | None = None, draws: int = 1) -> torch.Tensor:
        """MSE between predicted and target velocity (the release's only Stage-2 loss).

        action: (B, 64, 2) normalised GT. `draws` > 1 reuses each prefix for several (t, eps) draws.
        """
        if draws > 1:
            action, prefix = action.repeat_interleave(draws, 0), prefix.repeat_interleave(draws)
        bsz = action.shape[0]
        t = sample_time(bsz, self.cfg.diffusion, generator, device=action.device)
        noise = torch.randn(action.shape, generator=generator, device=action.device)
        x_t, target = interpolate(action.float(), noise, t)
        pred = self.velocity(x_t, t, prefix)
        return nn.functional.mse_loss(pred, target)

    @torch.no_grad()
    def sample_actions(self, prefix: KVPrefix, num_samples: int = 1, num_steps: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler-integrated normalised actions: (B, num_samples, 64, 2)."""
        rep = prefix.repeat_interleave(num_samples) if num_samples > 1 else prefix
        device = rep.lengths.device
        noise = torch.randn((rep.batch_size, N_ACTION, 2), generator=generator, device=device)
        x = euler_sample(lambda x, t: self.velocity(x, t, rep), noise,
                         num_steps or self.cfg.diffusion.num_inference_steps)
        return x.view(prefix.batch_size, num_samples, N_ACTION, 2)

    @torch.no_grad()
    def sample_trajectories(self, prefix: KVPrefix, hist_xyz: torch.Tensor, hist_rot: torch.Tensor,
                            num_samples: int = 1, num_steps: int | None = None,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, num_samples, 64, 3) predicted future xyz in the ego frame at t0."""
        actions = self.sample_actions(prefix, num_samples, num_steps, generator)
        bsz = actions.shape[0]
        hx = hist_xyz.float().repeat_interleave(num_samples, 0)
        hr = hist_rot.float().repeat_interleave(num_samples, 0)
        xyz, _ = self.action_space.action_to_traj(actions.flatten(0, 1).float(), hx, hr)
        return xyz.view(bsz, num_samples, N_ACTION, 3)
