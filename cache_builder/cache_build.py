"""cache-build: run the frozen VLM once per sample and write its KV prefix to a Zarr store.

    cache-build --dataset /data/pai --checkpoint nvidia/Alpamayo-R1-10B --name front --cameras front-only

Flow, three overlapped stages:
  CPU stage (DataLoader worker processes): dataset -> Sample -> VLM inputs (the release's prompt),
      GT action, curvature, thumbnails;
  GPU stage (this thread): equal-length batches -> prefill from pinned inputs, never waiting on the GPU;
  store writer: per sample a staging thread, on its own CUDA stream, stacks or quantises K/V, counts
      NaN/Inf and copies once to the host, into the shared slab of a writer process (--writer-processes)
      that compresses, writes and commits it; or, with 0 processes, the thread writes in-process.
A killed build resumes with --resume: finished samples are skipped, unfinished ones are redone.
`--shard i/N` takes the clips whose stable hash falls in shard i, so N processes (or
`accelerate launch`) can fill one store.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.checkpoint import AlpamayoCheckpoint
from shared.cli import check_device, config_from_args, user_errors
from shared.failpoints import failpoint
from shared.images import PIXEL_PATHS
from shared.prompt import build_vlm_inputs
from shared.qwen_files import load_processor
from shared.release import A15
from shared.sample import Sample
from shared.store import CODECS, CachedSample, KVSpec, StoreWriter, estimate_sample_bytes, make_thumbnails

from .release15 import NavSource, attach15, inputs15, provenance15

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
    pixels: str = "inference"  # image path: inference (release inference, uint8 resize; default) | stage2 (official Stage-2 training, float resize)
    keyframes: str = "default"  # default (5.1 s) | max-curvature | stride:<s> | turn-onset
    clips: str | None = None  # comma list of clip ids, or @file with one id per line (default: all)
    split: str | None = None  # only clips of this split (train / val)
    max_samples: int | None = None  # stop after this many samples (per shard)
    kv_dtype: str = "bfloat16"  # bfloat16 (release) | float32
    quant: str = "none"  # none | int8 | int4
    codec: str = "zstd"  # lossless codec of the stored arrays
    hidden: bool = True  # store last-layer hidden states of the prefix
    batch_size: int = 4  # prefixes per VLM forward (same-length prefixes are batched)
    workers: int | None = None  # CPU-stage processes (video decode, prompt, GT); default: 0 on CPU, min(4, cores/4) on GPU
    writer_threads: int | None = None  # store writer threads when --writer-processes is 0; default: min(8, cores/2)
    writer_processes: int | None = None  # processes that compress + write the store (Linux); 0: threads do; default: min(8, cores/2) on GPU, 0 on CPU
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
    navigation: str = "none"  # Alpamayo 1.5 route text: none | generate (from the future path) | annotations JSON
    nav_conflicts: str = "drop"  # annotation left/right contradicting the egomotion: drop (no route) | keep
    unguided: bool = False  # Alpamayo 1.5: also store the unguided suffix KV (guidance at eval, route dropout)

    def validate(self) -> tuple[int, int]:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.kv_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--kv-dtype {self.kv_dtype!r}: use bfloat16 or float32")
        if self.pixels not in PIXEL_PATHS:
            raise ValueError(f"--pixels {self.pixels!r}: use one of {', '.join(PIXEL_PATHS)}")
        if self.quant not in ("none", "int8", "int4"):
            raise ValueError(f"--quant {self.quant!r}: use none, int8 or int4")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.codec not in CODECS:
            raise ValueError(f"--codec {self.codec!r}: use one of {', '.join(CODECS)}")
        check_device("--device", self.device)
        if self.device.startswith("cuda"):
            n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
            idx = int(self.device.split(":")[1]) if ":" in self.device else 0
            if idx >= n_gpu:
                raise ValueError(f"--device {self.device!r}: this machine has {n_gpu} CUDA device(s)")
        if self.attn not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(f"--attn {self.attn!r}: use sdpa, eager or flash_attention_2")
        if self.max_samples is not None and self.max_samples < 0:
            raise ValueError(f"--max-samples {self.max_samples}: must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers {self.workers}: must be >= 0")
        if self.writer_threads is not None and self.writer_threads < 1:
            raise ValueError(f"--writer-threads {self.writer_threads}: must be >= 1")
        if self.writer_processes is not None and self.writer_processes < 0:
            raise ValueError(f"--writer-processes {self.writer_processes}: must be >= 0")
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
        "pixels": cfg.pixels,  # which official image path made pixel_values (shared.images.PIXEL_PATHS)
        "dataset_revision": ds.revision,
        "dataset_root": str(Path(cfg.dataset).resolve()),
        "keyframes": cfg.keyframes,
        "code_version": CODE_VERSION,
    }


@dataclass
class Prepared:
    """One sample after the CPU stage: VLM inputs and ground truth. The camera frames stay behind
    (only thumbnails cross the process boundary: 16 frames at 1080p are 100 MB)."""

    sample: Sample  # images emptied to (n_cam, 0, 3, 0, 0)
    inputs: dict  # build_vlm_inputs(...): input_ids (1, T), pixel_values (patches, 1536), ...
    thumbs: np.ndarray  # (n_cam, 72, 128, 3) uint8, t0 frame of each camera
    action: np.ndarray  # (64, 2) float32 normalised GT action
    v0: float
    curvature: dict[str, float]
    generated: object = None  # rollout: rollout.GeneratedPrefix (K/V/hidden from the generation), else None


@dataclass
class StageReport:
    """What one CPU-stage worker left out; sent last on its stream."""

    already_done: int = 0
    no_reasoning: int = 0
    skipped: list = field(default_factory=list)  # SkipItem of unreadable clips


class CpuStage(torch.utils.data.IterableDataset):
    """samples -> Prepared, in DataLoader workers (or inline with 0 workers).

    `samples(w, n)` yields worker w's share of n. Samples already in the store or without the
    reasoning text they need are counted, not built."""

    def __init__(self, samples: Callable[[int, int], Iterable[Sample]], processor, action_space, mode: str,
                 done: set[str] = frozenset(), cots=None, pixel_dtype: torch.dtype = torch.float32,
                 pixels: str = "inference", nav=None):
        self.samples, self.processor, self.action_space, self.mode = samples, processor, action_space, mode
        self.done, self.cots, self.pixel_dtype, self.pixels = done, cots, pixel_dtype, pixels
        self.nav = nav  # release15.NavSource for an Alpamayo 1.5 checkpoint, None for R1

    def prepare(self, s: Sample) -> Prepared:
        if self.nav is not None:  # Alpamayo 1.5 checkpoint
            x = inputs15(self.processor, s, self.mode, self.nav, self.pixels)
        else:
            x = build_vlm_inputs(self.processor, s, mode=self.mode, cot=s.cot if self.mode == "given-cot" else None,
                                 pixels=self.pixels)
        # the VLM's dtype already here: the same rounding as on the GPU, half the bytes to move
        x["pixel_values"] = x["pixel_values"].to(self.pixel_dtype)
        action, v0 = gt_action(self.action_space, s)
        thumbs = make_thumbnails(s.images, (72, 128))
        light = replace(s, images=np.empty((len(s.camera_names), 0, 3, 0, 0), np.uint8))
        return Prepared(light, x, thumbs, action, v0, curvature_summary(self.action_space, s, action))

    def __iter__(self) -> Iterator[Prepared | StageReport]:
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        rep = StageReport()
        it = self.samples(w, n)
        for s in it:
            if s.key in self.done:
                rep.already_done += 1
                continue
            if self.mode == "given-cot":
                s.cot = s.cot or self.cots.lookup(s.clip_id, s.t0_us, s.key)
                if not s.cot:
                    rep.no_reasoning += 1
                    continue
            yield self.prepare(s)
        rep.skipped = list(getattr(getattr(it, "report", None), "items", []))
        yield rep


class DatasetSamples:
    """The selected clips of a local dataset, split over CPU-stage workers by position (picklable)."""

    def __init__(self, root: str, clips: list[str], keyframes: str, cameras: str):
        self.root, self.clips, self.keyframes, self.cameras = root, clips, keyframes, cameras

    def __call__(self, w: int, n: int):
        from shared.data import iter_samples, open_dataset

        return iter_samples(open_dataset(self.root), self.clips[w::n], self.keyframes, self.cameras)


def cpu_stage_loader(stage: CpuStage, workers: int) -> Iterable[Prepared | StageReport]:
    return torch.utils.data.DataLoader(stage, batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)


def _cat(xs: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """Concatenate on the host, straight into pinned memory when the copy to the GPU should not block."""
    if not pin:
        return torch.cat(xs)
    shape = (sum(x.shape[0] for x in xs), *xs[0].shape[1:])
    return torch.cat(xs, out=torch.empty(shape, dtype=xs[0].dtype, pin_memory=True))


class Builder:
    """Holds the frozen VLM and turns batches of prepared samples into store records."""

    def __init__(self, cfg: BuildConfig, processor, vlm, action_space, nav=None):
        self.cfg, self.processor, self.vlm, self.action_space = cfg, processor, vlm, action_space
        self.nav = nav  # release15.NavSource for an Alpamayo 1.5 checkpoint, None for R1
        self.kv_dtype = getattr(torch, cfg.kv_dtype)
        self._decoder = False  # rollout: made on first use (None when generate must run instead)
        # seconds the GPU stage stood waiting: for the CPU stage's next sample, for a free writer slot
        self.waited = {"inputs_s": 0.0, "writer_s": 0.0}

    def stage(self, samples: Callable[[int, int], Iterable[Sample]], done: set[str] = frozenset(), cots=None) -> CpuStage:
        return CpuStage(samples, self.processor, self.action_space, self.cfg.mode, done, cots, self.vlm.dtype,
                        self.cfg.pixels, self.nav)

    def expand(self, group: list[Prepared]) -> list[Prepared]:
        """Prompt -> expert prefix. Teacher / given-cot prompts already end at <|traj_future_start|>;
        rollout prompts end at <|cot_start|> and the VLM writes the rest (text kept as the reasoning)."""
        if self.cfg.mode != "rollout":
            return group
        from .rollout import generate_prefixes, make_decoder

        if self._decoder is False:
            self._decoder = make_decoder(self.vlm, self.processor)
        gen = generate_prefixes(self.vlm, self.processor, [p.sample.key for p in group], [p.inputs for p in group],
                                self.cfg.seed, self.cfg.max_new_tokens, keep_hidden=self.cfg.hidden,
                                decoder=self._decoder)
        for p, (x, cot, prefix) in zip(group, gen):
            p.sample.cot, p.inputs, p.generated = cot, x, prefix
        return group

    def record(self, p: Prepared, k, v, hidden, rope_delta) -> CachedSample:
        """k, v: (layers, kv_heads, L, head_dim) and hidden (L, hidden) on the device -> a store record."""
        L = p.inputs["prefix_len"]
        rec = CachedSample.from_sample(
            p.sample, k=k.to(self.kv_dtype), v=v.to(self.kv_dtype), rope_delta=rope_delta,
            token_ids=p.inputs["input_ids"][0, :L], hidden=None if hidden is None else hidden.to(self.kv_dtype),
            thumbs=p.thumbs, gt_action=p.action, v0=p.v0, reasoning=p.sample.cot or "", curvature=p.curvature)
        if self.nav is not None:
            attach15(rec, p.inputs, k, v, rope_delta, self.vlm, self.cfg.unguided)
        return rec

    def records(self, group: list[Prepared]) -> list[CachedSample]:
        """One batched prefill for same-length prefixes -> store records whose K/V/hidden stay on the
        device (the writer stages them). Nothing here waits for the GPU."""
        from .vlm import prefill

        xs = [p.inputs for p in group]
        L = xs[0]["prefix_len"]
        pin = self.vlm.device.type == "cuda"
        batch = {k: _cat([x[k] for x in xs], pin)  # cat, not stack, for pixel_values (Qwen3-VL)
                 for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")}
        failpoint("prefill", keys=[p.sample.key for p in group])
        pf = prefill(self.vlm, batch, L, keep_hidden=self.cfg.hidden)
        return [self.record(p, pf.keys[:, b], pf.values[:, b], None if pf.hidden is None else pf.hidden[b],
                            pf.rope_deltas[b]) for b, p in enumerate(group)]

    def run(self, items: Iterable[Prepared | StageReport], writer: StoreWriter, max_samples: int | None = None,
            bar: tqdm | None = None) -> tuple[int, StageReport]:
        """The GPU stage: group prepared samples by length, prefill, hand records to the writer.

        Two queues keyed by token length, so every forward is a batch of equal lengths (no padding).
        Returns (samples written, merged reports of the CPU stage)."""
        bs = self.cfg.batch_size
        prompts: dict[int, list[Prepared]] = {}  # prompt length -> samples before rollout
        prefixes: dict[int, list[Prepared]] = {}  # prefix length -> samples ready for prefill
        total = StageReport()
        n_new = 0
        t0 = time.perf_counter()

        def wrote(n: int) -> None:
            nonlocal n_new
            n_new += n
            if bar is not None:
                bar.update(n)
                bar.set_postfix(samples_s=f"{n_new / (time.perf_counter() - t0):.2f}",
                                GB=f"{writer.bytes_stored / 1e9:.3f}")

        def write(rec: CachedSample) -> None:
            t = time.perf_counter()
            writer.write(rec)
            self.waited["writer_s"] += time.perf_counter() - t

        def flush_prefixes(L: int) -> None:
            group = prefixes.pop(L)
            for rec in self.records(group):
                write(rec)
            wrote(len(group))

        def flush_prompts(T: int) -> None:
            for p in self.expand(prompts.pop(T)):
                if p.generated is not None:  # rollout: the generation's own cache is the prefix
                    g, p.generated = p.generated, None
                    write(self.record(p, g.k, g.v, g.hidden, g.rope_delta))
                    wrote(1)
                    continue
                prefixes.setdefault(p.inputs["prefix_len"], []).append(p)
                if len(prefixes[p.inputs["prefix_len"]]) >= bs:
                    flush_prefixes(p.inputs["prefix_len"])

        it = iter(items)
        while True:
            t = time.perf_counter()
            item = next(it, None)
            self.waited["inputs_s"] += time.perf_counter() - t
            if item is None:
                break
            if isinstance(item, StageReport):
                total.already_done += item.already_done
                total.no_reasoning += item.no_reasoning
                total.skipped += item.skipped
                continue
            queued = sum(map(len, prompts.values())) + sum(map(len, prefixes.values()))
            if max_samples is not None and n_new + queued >= max_samples:
                break
            T = item.inputs["input_ids"].shape[1]
            prompts.setdefault(T, []).append(item)
            if len(prompts[T]) >= bs:
                flush_prompts(T)
        for T in list(prompts):
            flush_prompts(T)
        for L in list(prefixes):
            flush_prefixes(L)
        return n_new, total


def resolve_build_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_workers(cfg: BuildConfig, device: torch.device) -> tuple[int, int, int]:
    """(CPU-stage processes, writer threads, writer processes). Input building costs ~0.2-0.3 s of CPU per
    4-camera sample against ~0.15 s of GPU. On a GPU the writes go to processes: in-process zarr writes
    hold the GIL the prefill thread launches kernels with (docs/PERFORMANCE.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpu = device.type == "cuda"
    workers = cfg.workers if cfg.workers is not None else (min(4, max(1, cores // 4)) if gpu else 0)
    procs = cfg.writer_processes if cfg.writer_processes is not None else (min(8, max(2, cores // 2)) if gpu else 0)
    threads = procs or (cfg.writer_threads if cfg.writer_threads is not None else min(8, max(2, cores // 2)))
    return workers, threads, procs


def build(cfg: BuildConfig) -> dict:
    from shared.data import SkipReport, iter_samples, open_dataset
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
    nav = None
    if ckpt.release is A15:
        nav = NavSource(cfg.navigation, cfg.nav_conflicts)
    elif cfg.navigation != "none" or cfg.unguided:
        raise ValueError(f"--navigation / --unguided need an Alpamayo 1.5 checkpoint; {cfg.checkpoint} is "
                         f"{ckpt.release.model_type}")
    processor = load_processor(str(ckpt.vlm_base), min_pixels=ckpt.config.get("min_pixels", 163840),
                               max_pixels=ckpt.config.get("max_pixels", 196608),
                               local_files_only=not cfg.allow_download)
    vlm_text = ckpt.vlm_config_dict()["text_config"]
    spec = KVSpec(num_layers=head_cfg.num_layers, num_kv_heads=head_cfg.num_kv_heads, head_dim=head_cfg.head_dim,
                  hidden_size=int(vlm_text["hidden_size"]), kv_dtype=cfg.kv_dtype, quant=cfg.quant,
                  store_hidden=cfg.hidden, codec=cfg.codec, navigation=nav is not None, unguided=cfg.unguided)
    prov = provenance(cfg, ckpt, ds, processor)
    if nav is not None:
        prov.update(provenance15(cfg.mode, nav, cfg.unguided))
    cots = ReasoningIndex()
    if cfg.mode == "given-cot":
        cots = ReasoningIndex.from_json(cfg.cot_file) if cfg.cot_file else ReasoningIndex.from_dataset(cfg.dataset)
        if not len(cots):
            raise ValueError(f"--mode given-cot: no reasoning text in {cfg.dataset}/reasoning/ood_reasoning.parquet; "
                             "pass --cot-file with a JSON {sample key or clip id: text}")

    if cfg.dry_run:
        samples = iter_samples(ds, clips, cfg.keyframes, cfg.cameras)
        first = next(iter(samples), None)
        if first is None:
            raise ValueError(f"no readable sample in the selected clips: {samples.report.counts}")
        L = (build_vlm_inputs(processor, first, mode=cfg.mode) if nav is None
             else inputs15(processor, first, cfg.mode, nav))["prefix_len"]
        est = estimate_sample_bytes(spec, L, n_cam=len(first.camera_names))
        report = {"store": cfg.store_url, "clips": len(clips), "prefix_len": L, "per_sample": asdict(est),
                  "estimated_total_stored_bytes_one_keyframe_per_clip": est.stored_bytes * len(clips)}
        print(json.dumps(report, indent=2))
        return report

    device = resolve_build_device(cfg.device)
    workers, threads, procs = default_workers(cfg, device)
    mode = "resume" if cfg.resume else ("overwrite" if cfg.overwrite else "new")
    writer = StoreWriter.create(cfg.store_url, prov, spec, mode=mode, writer_id=cfg.shard.replace("/", "of"),
                                workers=threads, max_pending=threads + cfg.batch_size, processes=procs)
    # on success the writer's exit commits what is queued (close); on an error it stops its threads and
    # processes first, so nothing of it writes (or logs) after the one error line the caller prints
    with writer:
        vlm = load_vlm(ckpt, torch.float32 if cfg.kv_dtype == "float32" else torch.bfloat16, device, cfg.attn)
        builder = Builder(cfg, processor, vlm, ckpt.action_space(), nav)
        stage = builder.stage(DatasetSamples(str(cfg.dataset), clips, cfg.keyframes, cfg.cameras),
                              done=writer.done_keys(), cots=cots)
        t0 = time.perf_counter()
        bar = tqdm(desc=f"cache-build {cfg.shard}", unit="sample", total=cfg.max_samples, dynamic_ncols=True)
        try:
            n_new, rep = builder.run(cpu_stage_loader(stage, workers), writer, cfg.max_samples, bar)
        finally:
            bar.close()  # ends the bar's line: an error after it starts a line of its own
    return {"store": writer.url, "written": n_new, "already_done": rep.already_done, "skipped_clips": SkipReport(rep.skipped).counts,
            "skipped_no_reasoning": rep.no_reasoning, "seconds": round(time.perf_counter() - t0, 2),
            "bytes_logical": writer.bytes_logical, "bytes_stored": writer.bytes_stored,
            "cpu_workers": workers, "writer_threads": threads, "writer_processes": procs,
            "gpu_stage_waited": {k: round(v, 2) for k, v in builder.waited.items()}}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the CPU stage forks after the tokenizer is used
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
    sys.exit(main())
