"""A tiny random-weight Alpamayo-R1 checkpoint in the release's exact format, built offline.

    tiny-checkpoint cache/tiny            # -> cache/tiny/alpamayo (checkpoint), cache/tiny/qwen3vl (VLM base)

`alpamayo/` holds config.json (the release's AlpamayoR1Config structure, hydra `_target_`s and
all), 2+ safetensors shards with the release's key names (`vlm.model.visual.*`,
`vlm.model.language_model.*`, `vlm.lm_head.weight`, `expert.*`, `action_*`) and the index.
`qwen3vl/` stands in for `vlm_name_or_path` (Qwen/Qwen3-VL-8B-Instruct): a tiny Qwen3-VL
config.json plus real processor/tokenizer files. The expert has as many layers as the VLM text
model, the same KV heads and head_dim, as the release requires.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .action_space import SolverWeights
from .checkpoint import INDEX_NAME, is_head_key
from .config import RELEASE_ACTION_SPACE, HeadConfig
from .head import AlpamayoHead


@dataclass(frozen=True)
class TinySizes:
    """Tiny stand-ins for the release shapes (release values in comments)."""

    text_hidden: int = 64  # 4096
    text_layers: int = 2  # 36
    text_heads: int = 4  # 32
    kv_heads: int = 2  # 8
    head_dim: int = 16  # 128
    text_intermediate: int = 128  # 12288
    mrope_section: tuple[int, int, int] = (4, 2, 2)  # (24, 20, 20): sums to head_dim / 2
    vision_depth: int = 2  # 27
    vision_hidden: int = 32  # 1152
    vision_heads: int = 2  # 16
    vision_intermediate: int = 64  # 4304
    deepstack: tuple[int, ...] = (0, 1)  # (8, 16, 24)
    expert_hidden: int = 32  # 2048
    expert_heads: int = 2  # 16
    expert_intermediate: int = 96  # 8256
    in_proj_hidden: int = 32  # 512


def _qwen3vl_config(sizes: TinySizes, tok_ids: dict[str, int], vocab_size: int, dtype: str = "bfloat16") -> dict:
    """Qwen3-VL's config.json in the form its hub repo ships and the official code's transformers (4.57.1)
    reads: `rope_theta` + `rope_scaling` in text_config (not transformers 5's `rope_parameters`, which
    4.57 ignores). Written out rather than produced by the installed transformers' `to_dict`;
    transformers 5 reads this form too."""
    text = {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": tok_ids["endoftext"], "dtype": dtype,
        "eos_token_id": tok_ids["im_end"], "head_dim": sizes.head_dim, "hidden_act": "silu", "hidden_size": sizes.text_hidden,
        "initializer_range": 0.02, "intermediate_size": sizes.text_intermediate, "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": sizes.text_heads,
        "num_hidden_layers": sizes.text_layers, "num_key_value_heads": sizes.kv_heads, "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": list(sizes.mrope_section), "rope_type": "default"},
        "rope_theta": 5_000_000, "use_cache": True, "vocab_size": vocab_size,
    }
    vision = {
        "deepstack_visual_indexes": list(sizes.deepstack), "depth": sizes.vision_depth,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": sizes.vision_hidden, "in_channels": 3,
        "initializer_range": 0.02, "intermediate_size": sizes.vision_intermediate, "model_type": "qwen3_vl",
        "num_heads": sizes.vision_heads, "num_position_embeddings": 2304, "out_hidden_size": sizes.text_hidden,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": tok_ids["image_pad"],
        "model_type": "qwen3_vl", "text_config": text, "tie_word_embeddings": False,
        "transformers_version": "4.57.1", "video_token_id": tok_ids["video_pad"], "vision_config": vision,
        "vision_end_token_id": tok_ids["vision_end"], "vision_start_token_id": tok_ids["vision_start"],
    }


def _action_space_cfg(curvature_bounds: float) -> dict:
    """UnicycleAccelCurvatureActionSpace's hydra config with the release constants and solver weights."""
    w = asdict(SolverWeights())
    return {
        "_target_": "alpamayo_r1.action_space.unicycle_accel_curvature.UnicycleAccelCurvatureActionSpace",
        **RELEASE_ACTION_SPACE, "accel_bounds": [-9.8, 9.8], "curvature_bounds": [-curvature_bounds, curvature_bounds],
        **{k: w[k] for k in sorted(w)},
    }


def _alpamayo_config(sizes: TinySizes, vlm_base: Path, vocab_size: int, traj_start: int,
                     traj_token_ids: dict[str, int]) -> dict:
    """The release config.json's structure (model_type alpamayo_r1, hydra sub-configs) at tiny sizes.

    Curvature bounds (used only by `is_within_bounds`): the class default 0.2 at the top level, 0.33 in
    the trajectory tokenizer's action space, as the ports quoting the release config give them."""
    return {
        "action_in_proj_cfg": {
            "_target_": "alpamayo_r1.models.action_in_proj.PerWaypointActionInProjV2",
            "hidden_size": sizes.in_proj_hidden, "max_freq": 100.0, "num_enc_layers": 2, "num_fourier_feats": 20,
        },
        "action_out_proj_cfg": {"_target_": "torch.nn.Linear"},
        "action_space_cfg": _action_space_cfg(0.2),
        "add_special_tokens": True,
        "architectures": ["AlpamayoR1"],
        "attn_implementation": "sdpa",
        "diffusion_cfg": {
            "_target_": "alpamayo_r1.diffusion.flow_matching.FlowMatching",
            "int_method": "euler", "num_inference_steps": 10, "train_timestep_sampler": "beta",
            "train_ignore_guidance_rate": 0.1, "inference_guidance_weight": 1.0,
        },
        "expert_cfg": {
            "hidden_size": sizes.expert_hidden, "num_attention_heads": sizes.expert_heads,
            "num_key_value_heads": sizes.kv_heads, "head_dim": sizes.head_dim,
            "intermediate_size": sizes.expert_intermediate,
        },
        "expert_non_causal_attention": True,
        "hist_traj_tokenizer_cfg": {
            "_target_": "alpamayo_r1.models.delta_tokenizer.DeltaTrajectoryTokenizer",
            "ego_xyz_max": [4, 4, 10], "ego_xyz_min": [-4, -4, -10], "num_bins": 1000, "predict_yaw": False,
        },
        "keep_same_dtype": True,
        "max_pixels": 196608,
        "min_pixels": 163840,
        "model_dtype": "bfloat16",
        "model_type": "alpamayo_r1",
        "tokens_per_future_traj": 128,
        "tokens_per_history_traj": 48,
        "traj_token_ids": traj_token_ids,
        "traj_token_start_idx": traj_start,
        "traj_tokenizer_cfg": {  # _recursive_ False: the tokenizer instantiates its own action space
            "_recursive_": False,
            "_target_": "alpamayo_r1.action_space.discrete_action_space.DiscreteTrajectoryTokenizer",
            "action_space_cfg": _action_space_cfg(0.33),
            "dims_max": [10, 10], "dims_min": [-10, -10], "num_bins": 3000,
        },
        "traj_vocab_size": 4000,
        "transformers_version": "4.57.1",
        "vlm_backend": "qwenvl3",
        "vlm_name_or_path": str(vlm_base.resolve()),
        "vocab_size": vocab_size,
    }


def write_tiny_checkpoint(out: str | Path, sizes: TinySizes = TinySizes(), seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16, num_shards: int = 3) -> Path:
    """Write `out/qwen3vl` and `out/alpamayo`; returns the checkpoint directory."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from .qwen_files import alpamayo_token_ids, load_processor, write_tiny_processor

    out = Path(out)
    base, ckpt = out / "qwen3vl", out / "alpamayo"
    base.mkdir(parents=True, exist_ok=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    write_tiny_processor(base)
    proc = load_processor(str(base))
    tok = proc.tokenizer
    ids = alpamayo_token_ids(tok)
    vocab_size = len(tok)
    qcfg = _qwen3vl_config(sizes, {
        "image_pad": tok.convert_tokens_to_ids("<|image_pad|>"), "video_pad": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end": tok.convert_tokens_to_ids("<|vision_end|>"),
        "endoftext": tok.convert_tokens_to_ids("<|endoftext|>"), "im_end": tok.convert_tokens_to_ids("<|im_end|>"),
    }, vocab_size, str(dtype).removeprefix("torch."))
    # The base repo's config carries the ORIGINAL vocab; the Alpamayo config enlarges it (release behaviour).
    base_cfg = json.loads(json.dumps(qcfg))
    base_cfg["text_config"]["vocab_size"] = len(tok) - 4000 - 28
    (base / "config.json").write_text(json.dumps(base_cfg, indent=2) + "\n")

    traj_token_ids = {k: tok.convert_tokens_to_ids(v) for k, v in {
        "history": "<|traj_history|>", "future": "<|traj_future|>", "history_start": "<|traj_history_start|>",
        "future_start": "<|traj_future_start|>", "history_end": "<|traj_history_end|>",
        "future_end": "<|traj_future_end|>"}.items()}
    alp = _alpamayo_config(sizes, base, vocab_size, ids["traj_start"], traj_token_ids)
    (ckpt / "config.json").write_text(json.dumps(alp, indent=2, sort_keys=True) + "\n")

    torch.manual_seed(seed)
    vlm = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_dict(qcfg))
    head = AlpamayoHead(HeadConfig.from_alpamayo_config(alp, qcfg["text_config"]))
    with torch.no_grad():  # random but non-trivial norms/biases, so equivalence tests exercise them
        for name, p in list(vlm.named_parameters()) + list(head.named_parameters()):
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {f"vlm.{k}": v for k, v in vlm.state_dict().items()}
    state.update(head.state_dict())
    state = {k: (v.to(dtype) if v.is_floating_point() and not k.startswith("action_space.") else v).contiguous()
             for k, v in state.items()}
    # Shard like the release: vlm tensors first, the head in the last shard(s), some shards mixed.
    keys = sorted(state, key=lambda k: (is_head_key(k), k))
    per = math.ceil(len(keys) / num_shards)
    weight_map = {}
    for i in range(num_shards):
        chunk = keys[i * per:(i + 1) * per]
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state[k] for k in chunk}, str(ckpt / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(v.numel() * v.element_size() for v in state.values())
    (ckpt / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiny-checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory (gets alpamayo/ and qwen3vl/)")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="stored weight dtype")
    p.add_argument("--shards", type=int, default=3, help="number of safetensors shards (>= 2)")
    a = p.parse_args(argv)
    if a.shards < 2:
        p.error("--shards must be >= 2 (the release is sharded)")
    ckpt = write_tiny_checkpoint(a.out, seed=a.seed, dtype=getattr(torch, a.dtype), num_shards=a.shards)
    print(f"tiny checkpoint: {ckpt}\nVLM base (vlm_name_or_path): {ckpt.parent / 'qwen3vl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
