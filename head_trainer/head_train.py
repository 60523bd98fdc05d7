"""head-train: fit the action expert + action projections from a cache store.

    head-train --cache cache/demo/store --out runs/demo --steps 300
    head-train --cache cache/front --out runs/front --preset 24gb          # the plan for a 24 GB card
    accelerate launch --num_processes 8 -m head_trainer.head_train ...     # data parallel

Reads top to bottom: config -> checks -> data -> model -> optimiser -> loop -> checkpoints.
The frozen VLM never runs here: every step reads cached KV prefixes. Defaults follow the
official Stage-2 recipe (AdamW lr 1e-4, weight decay 0, cosine to 1e-6 after 100 warm-up steps,
grad-norm clip 1.0, flow-matching MSE only). docs/TRAINING.md explains the options.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from shared.checkpoint import AlpamayoCheckpoint, check_head_file, head_from_state, load_head_file
from shared.cli import check_device, config_from_args, parser_for, user_errors
from shared.fast_expert import ATTENTION, resolve_attention
from shared.store import Store, StoreError

from . import distributed, run_dir
from .data import check_host_ram, make_loader, readable, split_indices, train_ram_plan
from .ema import EMA
from .feeder import check_int8_prefix
from .integrity import FiniteGuard, TrainingStopped, check_head_pairing, check_store_checkpoint, read_stop
from .logger import Logger
from .optim import build_optimizer, load_optimizer, save_optimizer
from .presets import apply_preset
from .route_mix import mix_indices
from .step import StepConfig, TrainStep, World
from .throughput import SteadyMeter
from .trainable import LORA_TARGETS, MODES, apply_trainable, official_state
from .validation import Validator


@dataclass
class TrainConfig:
    cache: str  # cache store (path or fsspec URL) written by cache-build
    out: str  # run directory: checkpoints, metrics.jsonl, config.json, tensorboard/
    preset: str | None = None  # debug | 24gb | 80gb: defaults for the card (flags given explicitly win)
    checkpoint: str | None = None  # official checkpoint the head starts from (default: the store's provenance)
    vlm_base: str | None = None  # override for the checkpoint's vlm_name_or_path
    init_head: str | None = None  # start from a head file of this tool instead of the checkpoint's head
    split: str = "train"  # which store split to train on ("all" = every sample)
    steps: int = 300  # optimiser steps
    batch_size: int = 4  # prefixes per device per micro-batch (global batch = this x processes x grad-accum)
    grad_accum: int = 1  # micro-batches accumulated per optimiser step
    draws: int = 1  # (t, eps) draws per prefix per step: amortises each cache read
    trainable: str = "all"  # all | projections | lora (docs/TRAINING.md)
    lora_rank: int = 16  # LoRA rank r (--trainable lora)
    lora_alpha: float = 16.0  # LoRA scale alpha (update = alpha / r * B A)
    lora_targets: str = LORA_TARGETS  # comma-separated expert module names that get adapters
    optimizer: str = "adamw"  # optimiser (docs/TRAINING.md lists the choices)
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-6  # cosine floor
    warmup_steps: int = 100  # linear warm-up
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max grad norm (0 = off)
    gradient_checkpointing: bool = False  # recompute expert layers in backward (less activation memory)
    recompute_attention: bool = False  # recompute only attention in backward: no per-layer prefix copy kept
    attention: str = "auto"  # split: the cached prefix read in place (Triton on CUDA) | sdpa over [prefix; action] copies | auto: split on CUDA, sdpa elsewhere
    int8_prefix: bool = False  # int8 stores: K/V slots hold the codes + scales, read in place by --attention split (half the slot memory, no dequantisation)
    fused_wgrad: bool = False  # expert linears accumulate dW straight into the gradient buffers the update reads (no copy or add per micro-batch)
    compile: bool = False  # torch.compile one expert layer (reused by all layers)
    cuda_graphs: bool = False  # capture the step as CUDA graphs (CUDA; shapes repeat through length buckets)
    gpu_memory_budget: str | None = None  # e.g. 24GiB: refuse before loading when the estimated peak exceeds it
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    num_workers: int = 0  # DataLoader worker processes reading the store
    ram_cache_gb: float = 2.0  # keep samples in pinned RAM up to this size (GB, the main process)
    val_split: str = "val"  # store split for validation
    val_every: int = 100  # steps between validations (0 = off); also at the end
    val_max_items: int = 64  # validation samples used (the first N of the split)
    val_draws: int = 4  # fixed (t, eps) draws per validation sample
    val_ade_items: int = 8  # samples for the quick val minADE (0 = off)
    keep_best: int = 2  # best heads by val loss kept in out/best
    ema_decay: float = 0.0  # EMA of the trainable weights (e.g. 0.999; 0 = off)
    ema_device: str = "same"  # same | cpu: where the EMA lives (an fp32 EMA of the full head is 9.1 GB)
    ema_dtype: str = "float32"  # float32 | bfloat16
    ema_every: int = 1  # update the EMA every N steps (decay**N each time)
    save_every: int = 100  # steps between checkpoints (and at the end)
    keep_last: int = 2  # checkpoints kept
    background_save: bool = True  # write checkpoints on a background thread (state copied to host first)
    log_every: int = 10
    tensorboard: bool = True  # TensorBoard event files in out/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "alpamayo-headtune"
    stop_after: int | None = None  # end this invocation after N more steps (time-boxed jobs; --resume later)
    resume: bool = False  # continue from the latest checkpoint in `out`
    allow_config_change: bool = False  # with --resume: accept result-altering config changes (printed)
    overwrite: bool = False  # replace an existing run directory
    unguided_mix: float = 0.0  # Alpamayo 1.5 stores: fraction of no-route (unguided) training items, e.g. 0.1
    skip_bad_samples: bool = False  # leave damaged samples out (the next readable one takes their place); listed at the end

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "draws", "save_every", "keep_last", "log_every",
                     "lora_rank", "val_max_items", "val_draws", "ema_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        for name in ("val_every", "val_ade_items", "keep_best", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 0")
        if not (0 < self.lr and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"--lr {self.lr} / --min-lr {self.min_lr}: need 0 < --lr and 0 <= --min-lr <= --lr")
        check_device("--device", self.device)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} is not shorter than the run (--steps {self.steps})")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: use auto, float32 or bfloat16")
        if self.trainable not in MODES:
            raise ValueError(f"--trainable {self.trainable!r}: use one of {', '.join(MODES)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay {self.ema_decay}: use 0 (off) or 0 < decay < 1")
        if self.ema_device not in ("same", "cpu") or self.ema_dtype not in ("float32", "bfloat16"):
            raise ValueError("--ema-device: same | cpu; --ema-dtype: float32 | bfloat16")
        if not self.lora_alpha > 0 or not [t for t in self.lora_targets.split(",") if t.strip()]:
            raise ValueError("--lora-alpha must be > 0 and --lora-targets name at least one module")
        if self.attention not in ("auto", *ATTENTION):
            raise ValueError(f"--attention {self.attention!r}: use one of auto, {', '.join(ATTENTION)}")
        if self.fused_wgrad and self.trainable != "all":
            raise ValueError(f"--fused-wgrad fills the expert's weight gradients; --trainable {self.trainable} "
                             "trains none of them: drop one")
        if self.int8_prefix and self.attention == "sdpa":
            raise ValueError("--int8-prefix is read by --attention split (SDPA needs a dequantised copy): drop one")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.allow_config_change and not self.resume:
            raise ValueError("--allow-config-change only applies with --resume")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def open_base(cfg: TrainConfig, store: Store) -> AlpamayoCheckpoint:
    ckpt_path = cfg.checkpoint or (store.provenance.get("checkpoint") or {}).get("path")
    if not ckpt_path:
        raise ValueError("the store records no checkpoint path; pass --checkpoint")
    ckpt = AlpamayoCheckpoint.open(ckpt_path, vlm_base=cfg.vlm_base)
    want = store.provenance.get("head_config_hash")
    have = ckpt.head_config().hash()
    if want and want != have:
        raise ValueError(f"{ckpt.path}: head config hash {have} differs from the store's {want}: the cache was "
                         "built for another head architecture")
    check_store_checkpoint(store, ckpt)  # another model / config than the store's prefixes came from
    if cfg.init_head:  # a head of another expert shape is refused naming the fields
        check_head_pairing(check_head_file(cfg.init_head), cfg.init_head, ckpt)
    return ckpt


def train(cfg: TrainConfig) -> Path:
    cfg.validate()
    out = Path(cfg.out)
    launch = distributed.detect()
    # ---- checks before any model loads ------------------------------------------------------------
    store = Store.open(cfg.cache, skip_damaged=cfg.skip_bad_samples)
    indices = split_indices(store, None if cfg.split == "all" else cfg.split)
    if not indices:
        raise ValueError(f"{cfg.cache}: no samples in split {cfg.split!r} (splits: "
                         f"{sorted({store.manifest(i)['split'] for i in range(len(store))})})")
    val_indices = split_indices(store, cfg.val_split)[: cfg.val_max_items] if cfg.val_every else []
    if cfg.val_every and not val_indices:
        print(f"head-train: note: no samples in split {cfg.val_split!r}: no validation", file=sys.stderr)
    elif set(val_indices) & set(indices):
        print(f"head-train: note: the validation samples (split {cfg.val_split!r}) are also trained on",
              file=sys.stderr)
    indices, mix = mix_indices(store, indices, cfg.unguided_mix, cfg.seed)  # 1.5 only; unchanged at 0
    device = resolve_device(cfg.device, launch.local_rank)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if cfg.int8_prefix:
        check_int8_prefix(store)
    if cfg.int8_prefix and resolve_attention(cfg.attention, device) != "split":
        raise ValueError(f"--int8-prefix needs the split attention; --attention {cfg.attention} is SDPA on {device}: "
                         "add --attention split")
    ckpt = open_base(cfg, store)
    head_cfg = ckpt.head_config()
    check_host_ram(train_ram_plan(cfg, store, indices, head_cfg, device, dtype),
                   "lower --ram-cache-gb (a cache: the rest is read from the store), --batch-size or --num-workers")
    if cfg.gpu_memory_budget:
        from .memory import check_train_budget, parse_bytes

        est = check_train_budget(cfg, head_cfg, max(store.manifest(i % len(store))["prefix_len"] for i in indices),
                                 str(dtype).removeprefix("torch."), store.spec.quant)
        if launch.is_main:
            print(f"head-train: estimated peak {est.describe()} within --gpu-memory-budget {cfg.gpu_memory_budget}",
                  file=sys.stderr)
        if device.type == "cuda":  # hold the run to the budget, as a card of that size would
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(cfg.gpu_memory_budget) / total), device)
    keys = [store.manifest(i % len(store))["key"] + ("#unguided" if i >= len(store) else "") for i in indices]
    meta = {"train_config": asdict(cfg), "base_checkpoint": ckpt.identity(), "head_config": head_cfg.to_dict(),
            "cache": {"url": store.url, "provenance": store.provenance, "split": cfg.split, "samples": len(indices),
                      "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}}
    if mix:
        meta["unguided_mix"] = mix
    distributed.init(launch, device)
    lock = run_dir.RunLock(out)
    try:
        refusal = None
        if launch.is_main:  # rank 0 owns the run directory; the other ranks follow its verdict
            try:
                _claim_run_dir(cfg, out, lock, meta)
            except user_errors() as exc:
                refusal = exc
        if not distributed.agree(refusal is None):
            raise refusal or ValueError("rank 0 refused the run directory (see its error)")
        return _train_locked(cfg, out, launch, store, indices, val_indices, device, dtype, ckpt, meta)
    finally:
        lock.release()
        distributed.shutdown()


def _claim_run_dir(cfg: TrainConfig, out: Path, lock: run_dir.RunLock, meta: dict) -> None:
    """Lock `out`, then: refuse an existing run without --resume/--overwrite, clear it, or check the resume."""
    lock.acquire()
    if run_dir.has_run(out) and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{out} exists; pass --resume to continue or --overwrite to start again")
    if cfg.overwrite:
        run_dir.clear_run_dir(out)
    if cfg.resume and run_dir.has_run(out):
        for line in run_dir.check_resume(out, meta, cfg.allow_config_change):
            print(f"head-train: config change accepted: {line}", file=sys.stderr)
    run_dir.write_atomic(out / "config.json", json.dumps(meta, indent=2, default=str) + "\n")


def _train_locked(cfg, out, launch, store, indices, val_indices, device, dtype, ckpt, meta) -> Path:
    resume_dir = run_dir.latest_checkpoint(out, warn=True) if cfg.resume else None

    # ---- model ------------------------------------------------------------------------------------
    start = json.loads((resume_dir / "state.json").read_text())["step"] if resume_dir else 0
    lora = cfg.trainable == "lora"
    if resume_dir is not None and not lora:
        state, _ = load_head_file(resume_dir / "head.safetensors")
    elif cfg.init_head:
        state, _ = load_head_file(cfg.init_head)
    else:
        state = ckpt.head_state_dict()
    head = head_from_state(ckpt.head_config(), state, dtype, device).train()
    del state
    params = apply_trainable(head, cfg.trainable, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    if resume_dir is not None and lora:
        named = dict(head.named_parameters())
        with torch.no_grad():
            for n, t in run_dir.load_tensors(resume_dir / "adapter.safetensors").items():
                named[n].copy_(t)
    opt = build_optimizer(params, cfg.optimizer, cfg.lr, cfg.weight_decay, capturable=cfg.cuda_graphs)
    if resume_dir is not None:
        load_optimizer(opt, resume_dir / "optimizer.safetensors")
    ema = None
    if cfg.ema_decay and launch.is_main:  # only rank 0 evaluates and saves it
        ema = EMA(dict(zip(names, params)), cfg.ema_decay, cfg.ema_device, cfg.ema_dtype, cfg.ema_every)
        if resume_dir is not None:
            src = "ema_adapter" if lora else "ema_head"
            ema.load(run_dir.load_tensors(resume_dir / f"{src}.safetensors"))
    world = World(launch.rank, launch.size, distributed.all_reduce_mean if launch.size > 1 else None)
    step_cfg = StepConfig(seed=cfg.seed, draws=cfg.draws, grad_clip=cfg.grad_clip, grad_accum=cfg.grad_accum,
                          compile=cfg.compile, cuda_graphs=cfg.cuda_graphs, checkpoint=cfg.gradient_checkpointing,
                          recompute_attention=cfg.recompute_attention, attention=resolve_attention(cfg.attention, device),
                          fused_wgrad=cfg.fused_wgrad)
    train_step = TrainStep(head, params, opt, step_cfg, world)

    def heads() -> dict:
        out_heads = {"head": official_state(head)}
        if ema is not None:
            out_heads["ema_head"] = official_state(head, ema.state())
        return out_heads

    def resume_extra() -> dict:
        extra = {"rng": rng_state(device)}  # stochastic rounding draws from the global generators
        if not lora:
            return extra
        extra["adapter"] = dict(zip(names, params))
        return extra | ({"ema_adapter": ema.state()} if ema is not None else {})

    # ---- loop -------------------------------------------------------------------------------------
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    main = launch.is_main
    last_ckpt = f"--resume (from step {start})"
    try:  # the RAM / GPU tiers read samples here
        loader = make_loader(store.url, indices, cfg.batch_size, cfg.seed, start, stop, cfg.num_workers,
                             pin_memory=device.type == "cuda", ram_budget_bytes=int(cfg.ram_cache_gb * 1e9),
                             rank=launch.rank, world_size=launch.size, grad_accum=cfg.grad_accum, device=device,
                             dtype=dtype, progress=main, skip_bad=cfg.skip_bad_samples, int8_prefix=cfg.int8_prefix)
        if cfg.skip_bad_samples:  # validation reads its few samples again and again: leave damaged ones out
            val_indices, val_bad = readable(store, val_indices)
            loader.skipped.update(val_bad | {f"manifest {k}": v for k, v in store.damaged_manifests.items()})
    except StoreError as exc:
        raise read_stop(exc, last_ckpt) from exc
    validator = Validator(store, val_indices, cfg.batch_size, cfg.val_draws, cfg.val_ade_items, device)
    writer = run_dir.CheckpointWriter(out, cfg.keep_last, cfg.background_save, save_optimizer)
    best = run_dir.BestK(out, cfg.keep_best, start, cfg.background_save) if main else None
    bar = tqdm(total=cfg.steps, initial=start, desc="head-train", unit="step", dynamic_ncols=True, disable=not main)
    log = Logger(out, start, bar, cfg.tensorboard, cfg.wandb, cfg.wandb_project, meta) if main else None
    guard = FiniteGuard()
    samples_per_step = cfg.batch_size * cfg.grad_accum * launch.size
    meter = SteadyMeter(device, skip=min(10, max(0, (stop - start) // 4)))
    loss_sum, t_last, n_window, t_start = torch.zeros((), device=device), time.perf_counter(), 0, time.perf_counter()
    try:
        batches = iter(loader)
        # the global generators feed stochastic rounding: seeded alike on every rank (replicas stay equal),
        # restored on resume (a resumed run draws what the uninterrupted one drew); set after the first
        # batch arrives, since starting the loader's iterator draws a worker seed from the CPU generator
        rng_file = resume_dir / "rng.safetensors" if resume_dir is not None else None
        rng_start = run_dir.load_tensors(rng_file) if rng_file is not None and rng_file.is_file() else None
        for step in range(start, stop):
            try:
                micro = [b.to(device) for b in next(batches)]
            except StoreError as exc:
                raise read_stop(exc, last_ckpt, f"before step {step + 1}: ") from exc
            if step == start:
                if rng_start is not None:
                    set_rng_state(rng_start, device)
                else:
                    torch.manual_seed(cfg.seed)
            guard.add(step, micro)
            meter.start(getattr(loader, "wait_s", 0.0))
            stats = train_step(micro, lr_at(step, cfg), step)
            meter.stop(getattr(loader, "wait_s", 0.0))
            if ema is not None:
                ema.update(params, step)
            loss_sum += stats.loss.detach()
            n_window += 1
            bar.update(1)
            done = step + 1
            is_val = bool(val_indices) and (done % cfg.val_every == 0 or done == cfg.steps)
            is_save = done % cfg.save_every == 0 or done in (cfg.steps, stop)
            if done % cfg.log_every == 0 or is_val or is_save:
                bad = guard.problem(last_ckpt)
                if not distributed.agree(bad is None):
                    raise TrainingStopped(bad or "another rank read non-finite data (see its error)")
                if launch.size > 1:
                    distributed.all_reduce_mean([loss_sum])  # each rank holds its share's loss
                loss = float(loss_sum) / n_window
                if not math.isfinite(loss):
                    raise TrainingStopped(f"step {done}: the loss is {loss} on finite data; lower --lr, then "
                                          f"{last_ckpt}")
                now = time.perf_counter()
                rec = {"step": done, "loss": loss, "grad_norm": float(stats.grad_norm), "lr": lr_at(step, cfg),
                       "samples_per_s": n_window * samples_per_step / max(now - t_last, 1e-9)}
                if is_val and main:
                    rec["val_loss"] = validator.loss(head)
                    rec["val_min_ade"] = validator.min_ade(head)
                    if ema is not None:
                        with ema.swapped_in(params):
                            rec["val_loss_ema"] = validator.loss(head)
                    best.offer(done, rec["val_loss"], heads(), meta)
                if main:
                    log.log(rec)
                loss_sum.zero_()
                n_window, t_last = 0, time.perf_counter()
            if is_save and main:
                writer.save(done, heads(), opt, meta, resume_extra())
                last_ckpt = f"--resume (from step {done})"
        if main:
            writer.wait()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            _summary(out, loader, stop - start, (stop - start) * samples_per_step, time.perf_counter() - t_start,
                     device, meter.result(samples_per_step))
    finally:
        bar.close()
        if main:
            log.close()
            writer.wait()
            best.wait()
    if not main:
        return out / "head.safetensors"
    final = run_dir.latest_checkpoint(out)
    if stop < cfg.steps:
        return final / "head.safetensors"
    run_dir.publish_heads(final, out)
    return out / "head.safetensors"


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global generators' states (uint8), saved with each checkpoint so a resumed run draws what an
    uninterrupted one would (torchao's stochastic rounding uses them; the loss draws do not)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _summary(out: Path, loader, steps: int, samples: int, wall_s: float, device: torch.device,
             steady: dict) -> None:
    """What bounded the run (time the loop waited for the loader), throughput and peak memory -> summary.json.

    `steady` (throughput.SteadyMeter) leaves out the first steps (compile, capture, tier fill)."""
    wait = float(getattr(loader, "wait_s", 0.0))
    rec = {"steps": steps, "samples": samples, "wall_s": round(wall_s, 3),
           "samples_per_s": round(samples / max(wall_s, 1e-9), 3), "loader_wait_s": round(wait, 3),
           "loader_wait_fraction": round(wait / max(wall_s, 1e-9), 4)}
    rec["bound"] = "loader" if rec["loader_wait_fraction"] > 0.1 else "step"
    line = (f"head-train: {steps} steps in {wall_s:.1f} s ({rec['samples_per_s']:.1f} samples/s); waited "
            f"{wait:.1f} s ({100 * rec['loader_wait_fraction']:.0f} %) for the loader: {rec['bound']}-bound")
    rec.update(steady)
    if getattr(loader, "skipped", None):  # --skip-bad-samples
        rec["skipped_samples"] = dict(sorted(loader.skipped.items()))
        print(f"head-train: skipped {len(loader.skipped)} damaged samples (--skip-bad-samples): "
              + "; ".join(f"{k}: {v}" for k, v in rec["skipped_samples"].items()), file=sys.stderr)
    if steady:
        line += (f"; steady state {steady['steady_ms_per_sample']:.1f} ms/sample over {steady['steady_steps']} steps"
                 + (f", GPU busy {100 * steady['gpu_busy_fraction']:.0f} %" if "gpu_busy_fraction" in steady else ""))
    if device.type == "cuda":
        rec["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        line += f"; peak GPU memory {rec['peak_gpu_gib']:.2f} GiB"
    (out / "summary.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(line, file=sys.stderr)


def explicit_flags(argv: list[str] | None) -> set[str]:
    """Fields the command line sets (presets fill in only the others)."""
    p = parser_for(TrainConfig, "head-train", "", ("cache", "out"))
    p.set_defaults(**{f.name: None for f in fields(TrainConfig)})
    return {k for k, v in vars(p.parse_args(argv)).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(TrainConfig, argv, "head-train", __doc__.split("\n\n")[0], ("cache", "out"))
    try:
        cfg = TrainConfig(**apply_preset(asdict(cfg), explicit_flags(argv)))
        head_path = train(cfg)
    except TrainingStopped as exc:
        print(f"head-train: stopped: {exc}", file=sys.stderr)
        return 1
    except user_errors() as exc:
        print(f"head-train: error: {exc}", file=sys.stderr)
        return 2
    if distributed.detect().is_main:
        print(f"head-train: done. fine-tuned head: {head_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
