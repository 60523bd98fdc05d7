"""Read an official-format checkpoint (and its vlm_name_or_path) the way the official code does, with
transformers 4.57.1, the version NVlabs/alpamayo pins. Run in a small venv without torch:

    .venv-tf457/bin/python tests/release_pin/check_release_configs.py CKPT [CKPT ...] [--build]

The official package is not on PyPI, so its two config classes are stood in for by classes with the
same constructor signatures (src/alpamayo_r1/config.py, models/base_model.py), built the same way
minus the processor (which needs torch); the tokenizer part of it is done for real. Hydra `_target_`s
are checked against the official module paths and constructor parameters. Tensors are checked from
the safetensors headers (shapes, dtypes), since numpy cannot hold bf16. Prints one JSON report and
exits 1 with the reasons when anything disagrees.
"""

from __future__ import annotations

import copy
import json
import struct
import sys
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PretrainedConfig, Qwen3VLConfig, Qwen3VLTextConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

PINNED = "4.57.1"

# Official constructor parameters (keyword names) of every hydra target a release config names.
TARGETS = {
    "alpamayo_r1.action_space.unicycle_accel_curvature.UnicycleAccelCurvatureActionSpace": {
        "accel_mean", "accel_std", "curvature_mean", "curvature_std", "accel_bounds", "curvature_bounds", "dt",
        "n_waypoints", "theta_lambda", "theta_ridge", "v_lambda", "v_ridge", "a_lambda", "a_ridge",
        "kappa_lambda", "kappa_ridge"},
    "alpamayo_r1.action_space.discrete_action_space.DiscreteTrajectoryTokenizer": {
        "action_space_cfg", "dims_min", "dims_max", "num_bins"},
    "alpamayo_r1.models.delta_tokenizer.DeltaTrajectoryTokenizer": {
        "ego_xyz_min", "ego_xyz_max", "ego_yaw_min", "ego_yaw_max", "num_bins", "predict_yaw", "load_weights"},
    "alpamayo_r1.models.action_in_proj.PerWaypointActionInProjV2": {
        "num_enc_layers", "hidden_size", "max_freq", "num_fourier_feats"},  # in_dims, out_dim come from the model
    "alpamayo_r1.diffusion.flow_matching.FlowMatching": None,  # takes **kwargs
    "torch.nn.Linear": set(),  # in/out features come from the model
}
REQUIRED = {"alpamayo_r1.action_space.discrete_action_space.DiscreteTrajectoryTokenizer":
            {"action_space_cfg", "dims_min", "dims_max", "num_bins"}}
TRAJ_TOKEN = {"history": "<|traj_history|>", "future": "<|traj_future|>",
              "history_start": "<|traj_history_start|>", "future_start": "<|traj_future_start|>",
              "history_end": "<|traj_history_end|>", "future_end": "<|traj_future_end|>"}
SPECIAL_TOKENS_KEYS = [
    "prompt_start", "prompt_end", "image_start", "image_pre_tkn", "image_end", "traj_history_start",
    "traj_history_pre_tkn", "traj_history_end", "cot_start", "cot_end", "meta_action_start", "meta_action_end",
    "traj_future_start", "traj_future_pre_tkn", "traj_future_end", "traj_history", "traj_future", "image_pad",
    "vectorized_wm", "vectorized_wm_start", "vectorized_wm_end", "vectorized_wm_pre_tkn", "route_start",
    "route_pad", "route_end", "question_start", "question_end", "answer_start", "answer_end"]


class ReasoningVLAConfigStandIn(PretrainedConfig):
    """models/base_model.py ReasoningVLAConfig: same signature; the processor part is done separately."""

    model_type = "alpamayo_reasoning_vla"

    def __init__(self, vlm_name_or_path="Qwen/Qwen3-VL-8B-Instruct", vlm_backend="qwenvl3", traj_tokenizer_cfg=None,
                 hist_traj_tokenizer_cfg=None, traj_vocab_size=768, tokens_per_history_traj=16,
                 tokens_per_future_traj=64, model_dtype="bfloat16", attn_implementation="flash_attention_2",
                 min_pixels=None, max_pixels=None, add_special_tokens=False, **kwargs):
        super().__init__(**kwargs)
        self.vlm_name_or_path = vlm_name_or_path
        self.vlm_backend = vlm_backend.lower()
        self.model_dtype = model_dtype
        self.attn_implementation = attn_implementation
        self.traj_tokenizer_cfg = traj_tokenizer_cfg
        self.hist_traj_tokenizer_cfg = hist_traj_tokenizer_cfg
        self.traj_vocab_size = traj_vocab_size
        self.tokens_per_history_traj = tokens_per_history_traj
        self.tokens_per_future_traj = tokens_per_future_traj
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.add_special_tokens = add_special_tokens


class AlpamayoR1ConfigStandIn(ReasoningVLAConfigStandIn):
    """config.py AlpamayoR1Config: same signature."""

    model_type = "alpamayo_r1"

    def __init__(self, diffusion_cfg=None, action_space_cfg=None, action_in_proj_cfg=None, action_out_proj_cfg=None,
                 expert_cfg=None, keep_same_dtype=True, expert_non_causal_attention=True, **kwargs):
        super().__init__(**kwargs)
        self.diffusion_cfg = diffusion_cfg
        self.action_space_cfg = action_space_cfg
        self.action_in_proj_cfg = action_in_proj_cfg
        self.action_out_proj_cfg = action_out_proj_cfg
        self.expert_cfg = expert_cfg
        self.keep_same_dtype = keep_same_dtype
        self.expert_non_causal_attention = expert_non_causal_attention


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def unknown_keys(d: dict, known: set[str]) -> list[str]:
    return sorted(k for k in d if k not in known)


def check_hydra(name: str, cfg: dict | None, problems: list[str]) -> None:
    if cfg is None:
        problems.append(f"{name} is missing")
        return
    target = cfg.get("_target_")
    if target not in TARGETS:
        problems.append(f"{name}._target_={target!r} is not an official class")
        return
    params = TARGETS[target]
    keys = {k for k in cfg if not k.startswith("_")}
    if params is not None and keys - params:
        problems.append(f"{name}: keys the official {target.rsplit('.', 1)[1]} does not take: {sorted(keys - params)}")
    missing = REQUIRED.get(target, set()) - keys
    if missing:
        problems.append(f"{name}: missing required {sorted(missing)}")


def check_vlm_base(base: Path, problems: list[str]) -> Qwen3VLConfig:
    raw = json.loads((base / "config.json").read_text())
    cfg = Qwen3VLConfig.from_pretrained(str(base))
    tc = cfg.text_config
    for part, d, cls in (("text_config", raw.get("text_config", {}), Qwen3VLTextConfig),
                         ("vision_config", raw.get("vision_config", {}), Qwen3VLVisionConfig)):
        extra = unknown_keys(d, set(cls().to_dict()))
        if extra:
            problems.append(f"{base}/config.json {part}: keys transformers {PINNED} does not know (ignored): {extra}")
    extra = unknown_keys(raw, set(Qwen3VLConfig().to_dict()))
    if extra:
        problems.append(f"{base}/config.json: top-level keys transformers {PINNED} does not know: {extra}")
    rs = tc.rope_scaling or {}
    if not rs.get("mrope_section") or sum(rs["mrope_section"]) * 2 != tc.head_dim:
        problems.append(f"text_config.rope_scaling={tc.rope_scaling!r}: the 4.57 rotary needs mrope_section "
                        f"summing to head_dim/2={tc.head_dim // 2}")
    if not rs.get("mrope_interleaved"):
        problems.append("text_config.rope_scaling.mrope_interleaved is not true")
    if "rope_theta" not in raw.get("text_config", {}):
        problems.append("text_config has no rope_theta (4.57 would use its default silently)")
    return cfg


def check_checkpoint(ckpt: Path, problems: list[str]) -> dict:
    raw = json.loads((ckpt / "config.json").read_text())
    cfg = AlpamayoR1ConfigStandIn.from_pretrained(str(ckpt))
    if cfg.model_type != raw.get("model_type"):
        problems.append(f"model_type {raw.get('model_type')!r} != 'alpamayo_r1'")
    base = Path(cfg.vlm_name_or_path)
    base = base if base.is_absolute() else ckpt / base
    vlm_cfg = check_vlm_base(base, problems)
    # _initialize_vlm_config / _build_processor: the tokenizer the release builds, and what config.json serialised
    tok = AutoTokenizer.from_pretrained(str(base))
    n_new = tok.add_tokens([f"<i{v}>" for v in range(cfg.traj_vocab_size)])
    if n_new != cfg.traj_vocab_size:
        problems.append(f"only {n_new} of {cfg.traj_vocab_size} <iN> tokens were new")
    if cfg.add_special_tokens:
        tok.add_tokens(["<|" + k + "|>" for k in SPECIAL_TOKENS_KEYS], special_tokens=True)
    else:
        tok.add_tokens(list(TRAJ_TOKEN.values()), special_tokens=True)
    derived = {"vocab_size": len(tok), "traj_token_start_idx": tok.convert_tokens_to_ids("<i0>"),
               "traj_token_ids": {k: tok.convert_tokens_to_ids(v) for k, v in TRAJ_TOKEN.items()}}
    for k, v in derived.items():
        if raw.get(k) != v:
            problems.append(f"config.json {k}={raw.get(k)!r}, the official tokenizer build gives {v!r}")
    for name in ("action_space_cfg", "diffusion_cfg", "action_in_proj_cfg", "action_out_proj_cfg",
                 "traj_tokenizer_cfg", "hist_traj_tokenizer_cfg"):
        check_hydra(name, getattr(cfg, name), problems)
    ttc = cfg.traj_tokenizer_cfg or {}
    if ttc.get("_recursive_") is not False:
        problems.append("traj_tokenizer_cfg._recursive_ must be false (the tokenizer instantiates its own action space)")
    check_hydra("traj_tokenizer_cfg.action_space_cfg", ttc.get("action_space_cfg"), problems)
    # _initialize_qwenvl3_vlm + AlpamayoR1.__init__: the VLM with the enlarged vocab, the expert's config
    vlm_cfg = Qwen3VLConfig.from_pretrained(str(base), dtype=cfg.model_dtype, attn_implementation="sdpa")
    vlm_cfg.text_config.vocab_size = raw["vocab_size"]
    expert = copy.deepcopy(vlm_cfg.text_config)
    for k, v in (cfg.expert_cfg or {}).items():
        setattr(expert, k, v)
    # tensors: every index key in a shard header with the shape the official modules would have
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    headers = {}
    for f in sorted(set(index.values())):
        headers.update({k: (f, v) for k, v in safetensors_header(ckpt / f).items()})
    missing = sorted(set(index) - set(headers))
    if missing:
        problems.append(f"index keys in no shard header: {missing[:5]}")
    wrong_file = sorted(k for k in index if k in headers and headers[k][0] != index[k])
    if wrong_file:
        problems.append(f"index points to the wrong shard for {wrong_file[:5]}")
    h, nh, kvh, hd = expert.hidden_size, expert.num_attention_heads, expert.num_key_value_heads, expert.head_dim
    expect = {
        "vlm.model.language_model.embed_tokens.weight": [raw["vocab_size"], vlm_cfg.text_config.hidden_size],
        "vlm.lm_head.weight": [raw["vocab_size"], vlm_cfg.text_config.hidden_size],
        "expert.norm.weight": [h], "action_out_proj.weight": [2, h], "action_out_proj.bias": [2],
        "action_in_proj.norm.weight": [h], "action_in_proj.encoder.trunk.6.weight":
            [h, int(cfg.action_in_proj_cfg["hidden_size"])],
    }
    for i in range(expert.num_hidden_layers):
        p = f"expert.layers.{i}."
        expect.update({p + "self_attn.q_proj.weight": [nh * hd, h], p + "self_attn.k_proj.weight": [kvh * hd, h],
                       p + "self_attn.v_proj.weight": [kvh * hd, h], p + "self_attn.o_proj.weight": [h, nh * hd],
                       p + "mlp.gate_proj.weight": [expert.intermediate_size, h],
                       p + "mlp.down_proj.weight": [h, expert.intermediate_size]})
    for k, shape in expect.items():
        got = headers.get(k, (None, {}))[1].get("shape")
        if got != shape:
            problems.append(f"{k}: shape {got} in the shards, the official modules need {shape}")
    if expert.num_key_value_heads != vlm_cfg.text_config.num_key_value_heads or expert.head_dim != vlm_cfg.text_config.head_dim:
        problems.append("expert KV heads / head_dim differ from the VLM's (the shared cache needs them equal)")
    head_keys = sorted(k for k in index if not k.startswith("vlm."))
    return {"path": str(ckpt), "tensors": len(index), "head_tensors": len(head_keys), "vocab_size": raw["vocab_size"],
            "rope_scaling": vlm_cfg.text_config.rope_scaling, "rope_theta": vlm_cfg.text_config.rope_theta,
            "head_dtypes": sorted({headers[k][1]["dtype"] for k in head_keys if k in headers}),
            "head_header": {k: headers[k][1]["shape"] for k in head_keys if k in headers}}


def build_and_load(ckpt: Path, problems: list[str]) -> dict:
    """With torch importable (optional): the modules AlpamayoR1.__init__ builds with this transformers --
    Qwen3VLForConditionalGeneration from the enlarged config, the expert by AutoModel.from_config with
    expert_cfg set over a copy of the text config, embed_tokens deleted -- loaded strictly from the shards."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel, Qwen3VLForConditionalGeneration

    raw = json.loads((ckpt / "config.json").read_text())
    base = Path(raw["vlm_name_or_path"])
    vlm_cfg = Qwen3VLConfig.from_pretrained(str(base if base.is_absolute() else ckpt / base), dtype=raw["model_dtype"])
    vlm_cfg.text_config.vocab_size = vlm_cfg.vocab_size = raw["vocab_size"]
    with torch.device("meta"):
        vlm = Qwen3VLForConditionalGeneration(vlm_cfg)
        expert_cfg = copy.deepcopy(vlm_cfg.text_config)
        expert_cfg._attn_implementation = "sdpa"
        for k, v in raw["expert_cfg"].items():
            setattr(expert_cfg, k, v)
        expert = AutoModel.from_config(expert_cfg)
        del expert.embed_tokens
    state = {}
    for f in sorted(set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values())):
        state.update(load_file(str(ckpt / f)))
    out = {}
    for prefix, module in (("vlm.", vlm), ("expert.", expert)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True, assign=True)
        same = all(torch.equal(module.state_dict()[k], v) for k, v in sub.items())
        if not same:
            problems.append(f"{prefix}* tensors changed on load")
        out[prefix.rstrip(".")] = len(sub)
    return out


def main(argv: list[str]) -> int:
    problems: list[str] = []
    if transformers.__version__ != PINNED:
        problems.append(f"transformers {transformers.__version__}, expected the official pin {PINNED}")
    build = "--build" in argv
    argv = [a for a in argv if a != "--build"]
    reports = [check_checkpoint(Path(p), problems) for p in argv]
    if build:
        for r in reports:
            r["loaded_strict"] = build_and_load(Path(r["path"]), problems)
    print(json.dumps({"transformers": transformers.__version__, "checkpoints": reports, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
