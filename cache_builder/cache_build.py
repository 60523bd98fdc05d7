"""cache-build: run the frozen VLM once per sample and write its KV prefix to a Zarr store.

    cache-build --dataset /data/pai --checkpoint nvidia/Alpamayo-R1-10B --name front --cameras front-only

Flow: dataset -> samples -> VLM inputs (the release's prompt) -> prefill (batched) -> store writer
(quantisation, compression and IO on background threads, overlapping the next prefill). A
killed build resumes with --resume: finished samples are skipped, unfinished ones are redone.
`--shard i/N` takes the clips whose stable hash falls in shard i, so N processes (or
`accelerate launch`) can fill one store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.checkpoint import AlpamayoCheckpoint
from shared.cli import config_from_args, user_errors
from shared.prompt import build_vlm_inputs
from shared.qwen_files import load_processor
from shared.sample import Sample
from shared.store import CachedSample, KVSpec, StoreWriter, estimate_sample_bytes

MODES = ("teacher", "rollout", "given-cot")
CODE_VERSION = "alpamayo-headtune 0.1.0"


@dataclass
class BuildConfig:
    dataset: str  # local PhysicalAI-AV copy (or a synthetic world written by synth-world)
    checkpoint: str  # official Alpamayo-R1 checkpoint directory or hub id
    out: str | None = None  # store path or fsspec URL (default: cache/<name>)
    name: str = "default"  # store name under cache/ when --out is not given
    vlm_base: str | None = None  # override for the checkpoint's vlm_name_or_path
    mode: str = "teacher"  # teacher (official Stage-2 prefix) | rollout (VLM writes its CoC) | given-cot
    cameras: str = "full"  # full | front-masked | front-only | comma list of camera names
    keyframes: str = "default"  # default (5.1 s) | max-curvature | stride:<s> | turn-onset
    clips: str | None = None  # comma list of clip ids, or @file with one id per line (default: all)
    split: str | None = None  # only clips of this split (train / val)
    max_samples: int | None = None  # stop after this many samples (per shard)
    kv_dtype: str = "bfloat16"  # bfloat16 (release) | float32
    quant: str = "none"  # none | int8 | int4
    codec: str = "zstd"  # lossless codec of the stored arrays
    hidden: bool = True  # store last-layer hidden states of the prefix
    batch_size: int = 4  # prefixes per VLM forward (same-length prefixes are batched)
    shard: str = "0/1"  # i/N: this process builds shard i of N; "auto" = accelerate's process index/count
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn: str = "sdpa"  # attention implementation of the VLM
    seed: int = 0  # rollout sampling seed
    max_new_tokens: int = 256  # rollout: most reasoning tokens generated (release eval: 256)
    cot_file: str | None = None  # given-cot: JSON {clip_id or sample key: text} (default: the dataset's reasoning/)
    resume: bool = False  # continue an existing store (same provenance)
    overwrite: bool = False  # delete an existing store first
    dry_run: bool = False  # estimate the store size and exit; loads no model
    allow_download: bool = False  # allow hub downloads for a hub id (needs network)

    def validate(self) -> tuple[int, int]:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.kv_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--kv-dtype {self.kv_dtype!r}: use bfloat16 or float32")
        if self.quant not in ("none", "int8", "int4"):
            raise ValueError(f"--quant {self.quant!r}: use none, int8 or int4")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")
        if self.shard == "auto":  # under `accelerate launch` (or torchrun): one shard per process
            from accelerate import PartialState

            state = PartialState()
            self.shard = f"{state.process_index}/{state.num_processes}"
            if self.device == "auto" and torch.cuda.is_available():
                self.device = f"cuda:{state.local_process_index}"
        try:
            i, n = (int(x) for x in self.shard.split("/"))
            assert 0 <= i < n
        except (ValueError, AssertionError):
            raise ValueError(f"--shard {self.shard!r}: expected i/N with 0 <= i < N") from None
        from shared.data import parse_keyframe_strategy, resolve_camera_config

        parse_keyframe_strategy(self.keyframes)
        resolve_camera_config(self.cameras)
        return i, n

    @property
    def store_url(self) -> str:
        return self.out or str(Path("cache") / self.name)


def shard_of(clip_id: str, n: int) -> int:
    """Stable across processes and machines (unlike Python's hash)."""
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "big") % n


def select_clips(ds, cfg: BuildConfig, shard: tuple[int, int]) -> list[str]:
    available = ds.clip_ids()
    if cfg.clips:
        if cfg.clips.startswith("@"):
            wanted = [ln.strip() for ln in Path(cfg.clips[1:]).read_text().splitlines() if ln.strip()]
        else:
            wanted = [c.strip() for c in cfg.clips.split(",") if c.strip()]
        missing = sorted(set(wanted) - set(available))
        if missing:
            raise ValueError(f"--clips: {len(missing)} clip(s) not in {cfg.dataset}: {missing[:5]}")
        available = wanted
    if cfg.split:
        available = [c for c in available if ds.split_of(c) == cfg.split]
    i, n = shard
    return [c for c in available if shard_of(c, n) == i]


def gt_action(head_space, s: Sample) -> tuple[np.ndarray, float]:
    """Normalised GT action (64, 2) and v0 with the checkpoint's own action space."""
    t = [torch.as_tensor(a, dtype=torch.float32)[None] for a in
         (s.ego_history_xyz, s.ego_history_rot, s.ego_future_xyz, s.ego_future_rot)]
    action = head_space.traj_to_action(*t)[0].numpy().astype(np.float32)
    v0 = float(head_space.estimate_v0(t[0], t[1])[0])
    return action, v0


def curvature_summary(head_space, s: Sample, action: np.ndarray) -> dict[str, float]:
    """Numbers to select samples by: the clip's scan statistics and this keyframe's future curvature."""
    _, kappa = head_space.denormalize(torch.from_numpy(action))
    kappa = kappa.numpy().astype(np.float64)  # (64,) 1/m, left positive
    i = int(np.abs(kappa).argmax())
    out = {"future_max_abs_kappa": float(abs(kappa[i])), "future_signed_peak_kappa": float(kappa[i]),
           "future_mean_kappa": float(kappa.mean())}
    clip = s.meta.get("curvature", {})
    for k in ("max_abs_kappa", "mean_abs_kappa", "signed_peak_kappa"):
        if isinstance(clip.get(k), (int, float)):
            out[f"clip_{k}"] = float(clip[k])
    return out


def provenance(cfg: BuildConfig, ckpt: AlpamayoCheckpoint, ds, processor) -> dict:
    tok = processor.tokenizer
    return {
        "checkpoint": ckpt.identity(),
        "head_config_hash": ckpt.head_config().hash(),
        "processor": {"path": str(ckpt.vlm_base), "vocab_size": len(tok),
                      "tokenizer_class": type(tok).__name__, "min_pixels": ckpt.config.get("min_pixels", 163840),
                      "max_pixels": ckpt.config.get("max_pixels", 196608)},
        "prefix_mode": cfg.mode,
        "dataset_revision": ds.revision,
        "dataset_root": str(Path(cfg.dataset).resolve()),
        "keyframes": cfg.keyframes,
        "code_version": CODE_VERSION,
    }


class Builder:
    """Holds the frozen VLM and turns batches of samples into store records."""

    def __init__(self, cfg: BuildConfig, processor, vlm, action_space):
        self.cfg, self.processor, self.vlm, self.action_space = cfg, processor, vlm, action_space
        self.kv_dtype = getattr(torch, cfg.kv_dtype)

    def inputs(self, s: Sample) -> dict:
        return build_vlm_inputs(self.processor, s, mode=self.cfg.mode, cot=s.cot if self.cfg.mode == "given-cot" else None)

    def expand(self, group: list[tuple[Sample, dict]]) -> list[tuple[Sample, dict]]:
        """Prompt -> expert prefix. Teacher / given-cot prompts already end at <|traj_future_start|>;
        rollout prompts end at <|cot_start|> and the VLM writes the rest (text kept as the reasoning)."""
        if self.cfg.mode != "rollout":
            return group
        from .rollout import generate_prefixes

        out = []
        gen = generate_prefixes(self.vlm, self.processor, [s.key for s, _ in group], [x for _, x in group],
                                self.cfg.seed, self.cfg.max_new_tokens)
        for (s, _), (x, cot) in zip(group, gen):
            s.cot = cot
            out.append((s, x))
        return out

    def records(self, samples: list[Sample], inputs: list[dict]) -> list[CachedSample]:
        """One batched prefill for same-length prompts -> store records."""
        from .vlm import prefill

        L = inputs[0]["prefix_len"]
        batch = {
            "input_ids": torch.cat([x["input_ids"] for x in inputs]),
            "attention_mask": torch.cat([x["attention_mask"] for x in inputs]),
            "mm_token_type_ids": torch.cat([x["mm_token_type_ids"] for x in inputs]),
            "pixel_values": torch.cat([x["pixel_values"] for x in inputs]),  # cat, not stack (Qwen3-VL)
            "image_grid_thw": torch.cat([x["image_grid_thw"] for x in inputs]),
        }
        pf = prefill(self.vlm, batch, L, keep_hidden=self.cfg.hidden)
        out = []
        for b, (s, x) in enumerate(zip(samples, inputs)):
            action, v0 = gt_action(self.action_space, s)
            out.append(CachedSample.from_sample(
                s, k=pf.keys[:, b].to(self.kv_dtype).cpu(), v=pf.values[:, b].to(self.kv_dtype).cpu(),
                rope_delta=int(pf.rope_deltas[b]), token_ids=x["input_ids"][0, :L].cpu(),
                hidden=None if pf.hidden is None else pf.hidden[b].to(self.kv_dtype).cpu(),
                gt_action=action, v0=v0, reasoning=s.cot or "",
                curvature=curvature_summary(self.action_space, s, action),
            ))
        return out


def resolve_build_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build(cfg: BuildConfig) -> dict:
    from shared.data import iter_samples, open_dataset
    from shared.data.reasoning import ReasoningIndex

    from .vlm import load_vlm

    shard = cfg.validate()
    # ---- everything checked before a model loads -------------------------------------------------
    ds = open_dataset(cfg.dataset)
    clips = select_clips(ds, cfg, shard)
    if not clips:
        raise ValueError(f"no clips to build in {cfg.dataset} (shard {cfg.shard}, split {cfg.split})")
    ckpt = AlpamayoCheckpoint.open(cfg.checkpoint, vlm_base=cfg.vlm_base, allow_download=cfg.allow_download)
    head_cfg = ckpt.head_config()
    processor = load_processor(str(ckpt.vlm_base), min_pixels=ckpt.config.get("min_pixels", 163840),
                               max_pixels=ckpt.config.get("max_pixels", 196608),
                               local_files_only=not cfg.allow_download)
    vlm_text = ckpt.vlm_config_dict()["text_config"]
    spec = KVSpec(num_layers=head_cfg.num_layers, num_kv_heads=head_cfg.num_kv_heads, head_dim=head_cfg.head_dim,
                  hidden_size=int(vlm_text["hidden_size"]), kv_dtype=cfg.kv_dtype, quant=cfg.quant,
                  store_hidden=cfg.hidden, codec=cfg.codec)
    prov = provenance(cfg, ckpt, ds, processor)
    cots = ReasoningIndex()
    if cfg.mode == "given-cot":
        cots = ReasoningIndex.from_json(cfg.cot_file) if cfg.cot_file else ReasoningIndex.from_dataset(cfg.dataset)
        if not len(cots):
            raise ValueError(f"--mode given-cot: no reasoning text in {cfg.dataset}/reasoning/ood_reasoning.parquet; "
                             "pass --cot-file with a JSON {sample key or clip id: text}")
    samples = iter_samples(ds, clips, cfg.keyframes, cfg.cameras)

    if cfg.dry_run:
        first = next(iter(samples), None)
        if first is None:
            raise ValueError(f"no readable sample in the selected clips: {samples.report.counts}")
        L = build_vlm_inputs(processor, first, mode=cfg.mode)["prefix_len"]
        est = estimate_sample_bytes(spec, L, n_cam=len(first.camera_names))
        report = {"store": cfg.store_url, "clips": len(clips), "prefix_len": L, "per_sample": asdict(est),
                  "estimated_total_stored_bytes_one_keyframe_per_clip": est.stored * len(clips)}
        print(json.dumps(report, indent=2))
        return report

    mode = "resume" if cfg.resume else ("overwrite" if cfg.overwrite else "new")
    writer = StoreWriter.create(cfg.store_url, prov, spec, mode=mode, writer_id=cfg.shard.replace("/", "of"))
    done = writer.done_keys()
    vlm = load_vlm(ckpt, torch.float32 if cfg.kv_dtype == "float32" else torch.bfloat16,
                   resolve_build_device(cfg.device), cfg.attn)
    builder = Builder(cfg, processor, vlm, ckpt.action_space())
    n_new = n_skipped = n_no_cot = 0
    t0 = time.perf_counter()
    bar = tqdm(desc=f"cache-build {cfg.shard}", unit="sample", total=cfg.max_samples, dynamic_ncols=True)
    # Two queues keyed by token length, so every forward is a batch of equal lengths (no padding):
    prompts: dict[int, list[tuple[Sample, dict]]] = {}  # prompt length -> samples before rollout
    prefixes: dict[int, list[tuple[Sample, dict]]] = {}  # prefix length -> samples ready for prefill

    def flush_prefixes(L: int) -> None:
        nonlocal n_new
        group = prefixes.pop(L)
        for rec in builder.records([s for s, _ in group], [x for _, x in group]):
            writer.write(rec)  # quantise + compress + write on the writer's threads, overlapping the next prefill
            n_new += 1
        bar.update(len(group))
        bar.set_postfix(samples_s=f"{n_new / (time.perf_counter() - t0):.2f}", GB=f"{writer.bytes_stored / 1e9:.3f}")

    def flush_prompts(T: int) -> None:
        for s, x in builder.expand(prompts.pop(T)):
            prefixes.setdefault(x["prefix_len"], []).append((s, x))
            if len(prefixes[x["prefix_len"]]) >= cfg.batch_size:
                flush_prefixes(x["prefix_len"])

    for s in samples:
        queued = sum(map(len, prompts.values())) + sum(map(len, prefixes.values()))
        if cfg.max_samples is not None and n_new + queued >= cfg.max_samples:
            break
        if s.key in done:
            n_skipped += 1
            continue
        if cfg.mode == "given-cot":
            s.cot = s.cot or cots.lookup(s.clip_id, s.t0_us, s.key)
            if not s.cot:
                n_no_cot += 1
                continue
        x = builder.inputs(s)
        T = x["input_ids"].shape[1]
        prompts.setdefault(T, []).append((s, x))
        if len(prompts[T]) >= cfg.batch_size:
            flush_prompts(T)
    for T in list(prompts):
        flush_prompts(T)
    for L in list(prefixes):
        flush_prefixes(L)
    writer.close()
    bar.close()
    summary = {"store": writer.url, "written": n_new, "already_done": n_skipped,
               "skipped_clips": samples.report.counts, "skipped_no_reasoning": n_no_cot, "seconds": round(time.perf_counter() - t0, 2),
               "bytes_logical": writer.bytes_logical, "bytes_stored": writer.bytes_stored}
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(BuildConfig, argv, "cache-build", __doc__.split("\n\n")[0], ("dataset", "checkpoint"))
    try:
        summary = build(cfg)
    except user_errors() as exc:
        print(f"cache-build: error: {exc}", file=sys.stderr)
        return 2
    if not cfg.dry_run:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
