"""head-train: fit the action expert + action projections from a cache store.

    head-train --cache cache/demo/store --out runs/demo --steps 300

Reads top to bottom: config -> checks -> data -> model -> optimiser -> loop -> checkpoints.
The frozen VLM never runs here: every step reads cached KV prefixes. Defaults follow the
official Stage-2 recipe (AdamW lr 1e-4, weight decay 0, cosine to 1e-6 after 100 warm-up steps,
grad-norm clip 1.0, flow-matching MSE only).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from shared.checkpoint import AlpamayoCheckpoint, head_from_state, load_head_file, save_head
from shared.cli import config_from_args, user_errors
from shared.head import AlpamayoHead
from shared.store import Store

from .data import make_loader, split_indices
from .optim import build_optimizer, load_optimizer, save_optimizer
from .route_mix import mix_indices
from .step import StepConfig, TrainStep


@dataclass
class TrainConfig:
    cache: str  # cache store (path or fsspec URL) written by cache-build
    out: str  # run directory: checkpoints, metrics.jsonl, config.json
    checkpoint: str | None = None  # official checkpoint the head starts from (default: the store's provenance)
    vlm_base: str | None = None  # override for the checkpoint's vlm_name_or_path
    init_head: str | None = None  # start from a head file of this tool instead of the checkpoint's head
    split: str = "train"  # which store split to train on ("all" = every sample)
    steps: int = 300  # optimiser steps
    batch_size: int = 4  # prefixes per step
    draws: int = 1  # (t, eps) draws per prefix per step: amortises each cache read
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-6  # cosine floor
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm (0 = off)
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    num_workers: int = 0  # DataLoader worker processes reading the store
    ram_cache_gb: float = 2.0  # keep decoded samples in RAM up to this size (per worker)
    save_every: int = 100  # steps between checkpoints (and at the end)
    keep_last: int = 2  # checkpoints kept
    log_every: int = 10
    stop_after: int | None = None  # end this invocation after N more steps (time-boxed jobs; --resume later)
    resume: bool = False  # continue from the latest checkpoint in `out`
    overwrite: bool = False  # replace an existing run directory
    unguided_mix: float = 0.0  # Alpamayo 1.5 stores: fraction of no-route (unguided) training items, e.g. 0.1

    def validate(self) -> None:
        for name in ("steps", "batch_size", "draws", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not (0 < self.lr and 0 <= self.min_lr <= self.lr):
            raise ValueError("need 0 < --lr and 0 <= --min-lr <= --lr")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: use auto, float32 or bfloat16")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def open_base(cfg: TrainConfig, store: Store) -> AlpamayoCheckpoint:
    ckpt_path = cfg.checkpoint or store.provenance.get("checkpoint", {}).get("path")
    if not ckpt_path:
        raise ValueError("the store records no checkpoint path; pass --checkpoint")
    ckpt = AlpamayoCheckpoint.open(ckpt_path, vlm_base=cfg.vlm_base)
    want = store.provenance.get("head_config_hash")
    have = ckpt.head_config().hash()
    if want and want != have:
        raise ValueError(f"{ckpt.path}: head config hash {have} differs from the store's {want}: the cache was "
                         "built for another head architecture")
    return ckpt


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted(out.glob("checkpoints/step_*/head.safetensors"))
    return steps[-1].parent if steps else None


def save_checkpoint(out: Path, step: int, head: AlpamayoHead, opt: torch.optim.Optimizer, meta: dict,
                    keep_last: int) -> Path:
    """checkpoints/step_N/{head.safetensors, optimizer.safetensors, state.json}, written then renamed."""
    final = out / "checkpoints" / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_head(head, tmp / "head.safetensors", {**meta, "step": step})
    save_optimizer(opt, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted((out / "checkpoints").glob("step_*[0-9]"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def train(cfg: TrainConfig) -> Path:
    cfg.validate()
    out = Path(cfg.out)
    # ---- checks before any model loads ------------------------------------------------------------
    store = Store.open(cfg.cache)
    indices = split_indices(store, None if cfg.split == "all" else cfg.split)
    if not indices:
        raise ValueError(f"{cfg.cache}: no samples in split {cfg.split!r} (splits: "
                         f"{sorted({store.manifest(i)['split'] for i in range(len(store))})})")
    indices, mix = mix_indices(store, indices, cfg.unguided_mix, cfg.seed)  # 1.5 only; unchanged at 0
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{out} exists; pass --resume to continue or --overwrite to start again")
    if cfg.overwrite:
        shutil.rmtree(out, ignore_errors=True)
    device = resolve_device(cfg.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    ckpt = open_base(cfg, store)
    head_cfg = ckpt.head_config()

    # ---- model ------------------------------------------------------------------------------------
    start = 0
    resume_dir = latest_checkpoint(out) if cfg.resume else None
    if resume_dir is not None:
        state, _ = load_head_file(resume_dir / "head.safetensors")
        start = json.loads((resume_dir / "state.json").read_text())["step"]
    elif cfg.init_head:
        state, _ = load_head_file(cfg.init_head)
    else:
        state = ckpt.head_state_dict()
    head = head_from_state(head_cfg, state, dtype, device).train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt = build_optimizer(params, "adamw", cfg.lr, cfg.weight_decay)
    if resume_dir is not None:
        load_optimizer(opt, resume_dir / "optimizer.safetensors")

    out.mkdir(parents=True, exist_ok=True)
    meta = {"train_config": asdict(cfg), "base_checkpoint": ckpt.identity(), "head_config": head_cfg.to_dict(),
            "cache": {"url": store.url, "provenance": store.provenance, "split": cfg.split, "samples": len(indices)}}
    if mix:
        meta["unguided_mix"] = mix
    (out / "config.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")

    # ---- loop -------------------------------------------------------------------------------------
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    loader = make_loader(store.url, indices, cfg.batch_size, cfg.seed, start, stop, cfg.num_workers,
                         pin_memory=device.type == "cuda", ram_budget_bytes=int(cfg.ram_cache_gb * 1e9),
                         device=device, dtype=dtype)
    train_step = TrainStep(head, params, opt, StepConfig(seed=cfg.seed, draws=cfg.draws, grad_clip=cfg.grad_clip))
    log = open(out / "metrics.jsonl", "a")
    bar = tqdm(total=cfg.steps, initial=start, desc="head-train", unit="step", dynamic_ncols=True)
    t_last, step = time.perf_counter(), start
    for step, micro in enumerate(loader, start=start):
        stats = train_step(micro, lr_at(step, cfg), step)  # noise is a function of (seed, step): resumable
        loss, gnorm = stats.loss, stats.grad_norm
        bar.update(1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            now = time.perf_counter()
            rec = {"step": step + 1, "loss": loss.item(), "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"],
                   "samples_per_s": cfg.log_every * cfg.batch_size / max(now - t_last, 1e-9)}
            t_last = now
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
        if (step + 1) % cfg.save_every == 0 or step + 1 in (cfg.steps, stop):
            save_checkpoint(out, step + 1, head, opt, meta, cfg.keep_last)
    bar.close()
    log.close()
    if stop < cfg.steps:
        return latest_checkpoint(out) / "head.safetensors"
    final = latest_checkpoint(out)
    if final is None or json.loads((final / "state.json").read_text())["step"] != cfg.steps:
        save_checkpoint(out, cfg.steps, head, opt, meta, cfg.keep_last)  # e.g. resumed at the end already
        final = latest_checkpoint(out)
    head_path = out / "head.safetensors"
    shutil.copy2(final / "head.safetensors", head_path)
    return head_path


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(TrainConfig, argv, "head-train", __doc__.split("\n\n")[0], ("cache", "out"))
    try:
        head_path = train(cfg)
    except user_errors() as exc:
        print(f"head-train: error: {exc}", file=sys.stderr)
        return 2
    print(f"head-train: done. fine-tuned head: {head_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
