"""A tiny random-weight Alpamayo 1.5 checkpoint, built offline beside the R1 one.

    python -m shared.tiny_checkpoint15 cache/tiny15 [--keep-buffers]

The 1.5 release `config.json` is gated and was not seen; its form here follows the code that loads
it (sheet §1.1): the R1 structure with `model_type "alpamayo1_5"`, `architectures ["Alpamayo1_5"]`,
every alpamayo `_target_` moved to the `alpamayo1_5.` namespace, the two new fields
`include_camera_ids` / `include_frame_nums` (class defaults; no inference code reads them) and a
1.5 `diffusion_cfg` without the removed training keys. The weights are R1's tiny ones (1.5 weights
are architecturally identical); the 7 non-persistent buffers are left out of the shards unless
`keep_buffers` (whether the release files hold them is not determined, so both forms are tested).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME
from .release import A15, BUFFER_KEYS, R1
from .tiny_checkpoint import TinySizes, write_tiny_checkpoint


def to_release15_config(r1_config: dict) -> dict:
    """An R1 config.json dict -> the inferred 1.5 form (the inverse of the official `to-a1` rewrite)."""
    cfg = json.loads(json.dumps(r1_config))
    cfg["model_type"], cfg["architectures"] = A15.model_type, [A15.architecture]
    for sub in cfg.values():
        if isinstance(sub, dict) and str(sub.get("_target_", "")).startswith(R1.target_namespace):
            sub["_target_"] = A15.target_namespace + sub["_target_"][len(R1.target_namespace):]
    cfg["include_camera_ids"] = False
    cfg["include_frame_nums"] = False
    d = cfg["diffusion_cfg"]
    cfg["diffusion_cfg"] = {"_target_": d["_target_"], "int_method": d.get("int_method", "euler"),
                            "num_inference_steps": d.get("num_inference_steps", 10),
                            "inference_guidance_weight": 1.0}
    return cfg


def write_tiny_checkpoint15(out: str | Path, sizes: TinySizes = TinySizes(), seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16, num_shards: int = 3,
                            keep_buffers: bool = False) -> Path:
    """Write `out/qwen3vl` and `out/alpamayo` (1.5 form); returns the checkpoint directory."""
    ckpt = write_tiny_checkpoint(out, sizes, seed, dtype, num_shards)
    cfg = to_release15_config(json.loads((ckpt / "config.json").read_text()))
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if keep_buffers:
        return ckpt
    index = json.loads((ckpt / INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    for fname in sorted({weight_map[k] for k in BUFFER_KEYS}):
        with safe_open(str(ckpt / fname), "pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys() if k not in BUFFER_KEYS}
            dropped = [f.get_tensor(k) for k in f.keys() if k in BUFFER_KEYS]
        index["metadata"]["total_size"] -= sum(t.numel() * t.element_size() for t in dropped)
        save_file(kept, str(ckpt / fname), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in weight_map.items() if k not in BUFFER_KEYS}
    (ckpt / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shared.tiny_checkpoint15", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output directory (gets alpamayo/ and qwen3vl/)")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="stored weight dtype")
    p.add_argument("--keep-buffers", action="store_true", help="keep the 7 non-persistent buffers in the shards")
    a = p.parse_args(argv)
    ckpt = write_tiny_checkpoint15(a.out, seed=a.seed, dtype=getattr(torch, a.dtype), keep_buffers=a.keep_buffers)
    print(f"tiny Alpamayo 1.5 checkpoint: {ckpt}\nVLM base (vlm_name_or_path): {ckpt.parent / 'qwen3vl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
