"""head-eval: sample trajectories from cached prefixes and score them against ground truth.

    head-eval --cache cache/demo/store --out runs/demo/eval_baseline.json                 # released head
    head-eval --cache cache/demo/store --head runs/demo/head.safetensors --out runs/demo/eval_ft.json \
              --baseline runs/demo/eval_baseline.json --plot runs/demo/compare.png

Metrics follow the release's definitions (docs/METRICS.md), overall and per GT curvature bin
(straight / gentle / sharp x left / right), with the straight-bias score on curved samples.
The result JSON carries its metadata: what was evaluated (checkpoint, head file hash, cache
provenance, split, sampler parameters) and how (code version, time, library versions, device).
When the same evaluation already exists the run is skipped (--force recomputes); an existing
result of a different evaluation is never replaced without --force.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from shared.checkpoint import (
    AlpamayoCheckpoint,
    check_head_file,
    head_from_state,
    load_head_file,
    sha256_file,
)
from shared.cli import check_device, config_from_args, user_errors
from shared.store import SampleReadError, Store, StoreError

from .data import bucket_len, check_host_ram, collate, sample_item, split_indices
from .guided_eval import guidance_options, sample_guided
from .integrity import check_head_pairing, check_store_checkpoint
from .metrics import curvature_bin, summarize, trajectory_metrics

RESULT_FORMAT = "alpamayo-headtune/eval/v2"
SUMMARY_KEYS = ("min_ade", "ade", "fde", "min_fde", "max_lat_dev", "corner_distance")


@dataclass
class EvalConfig:
    cache: str  # cache store to evaluate on
    out: str  # result JSON
    head: str | None = None  # fine-tuned head file (default: the checkpoint's released head = baseline)
    label: str | None = None  # name shown in tables and plots (default: baseline / the head file's run name)
    checkpoint: str | None = None  # official checkpoint (default: the store's provenance)
    vlm_base: str | None = None  # override for the checkpoint's vlm_name_or_path
    split: str = "val"  # store split to evaluate ('all' = every sample)
    num_samples: int = 6  # trajectories sampled per prefix (release eval default)
    steps: int = 10  # Euler steps (release default)
    seed: int = 0  # sampling seed
    batch_size: int = 8  # prefixes per forward
    max_items: int | None = None  # evaluate at most this many samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | bfloat16
    force: bool = False  # recompute, and replace an existing result of another evaluation
    baseline: str | None = None  # another result JSON to compare against in --plot
    plot: str | None = None  # write a PNG comparing baseline (if any) and this result
    navigation: str = "as-built"  # Alpamayo 1.5 stores: as-built (the stored route) | none (the unguided prefix)
    guidance_weight: float = 1.0  # Alpamayo 1.5: classifier-free guidance w (1 = off; official nav demo 1.5)
    noise_temperature: float = 1.0  # Alpamayo 1.5: initial-noise scale (release 1.0; official nav demo 0.6)
    live: int = 0  # also run the VLM on this many of the samples instead of reading their cache; report agreement (GPU)
    dataset: str | None = None  # --live: the dataset the store was built from (default: its provenance)
    skip_bad_samples: bool = False  # leave damaged samples out and list them in the result (default: refuse, naming it)
    allow_store_mismatch: bool = False  # evaluate a head / checkpoint on a store built otherwise (printed)

    def validate(self) -> None:
        for name in ("num_samples", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        check_device("--device", self.device)
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: use float32 or bfloat16")
        if self.head and not Path(self.head).is_file():
            raise ValueError(f"--head {self.head}: no such file (train one with head-train)")
        if self.head:
            check_head_file(self.head)  # a file that is not a head of this tool is refused before the store opens
        if self.live < 0:
            raise ValueError(f"--live {self.live}: must be >= 0")
        if self.baseline and not Path(self.baseline).is_file():
            raise ValueError(f"--baseline {self.baseline}: no such result file (run head-eval without --head first)")
        guidance_options(self)


def code_version() -> str:
    """`git describe` of the source tree this runs from ('unknown' outside a git checkout)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def identity(cfg: EvalConfig, store: Store, ckpt: AlpamayoCheckpoint, n_items: int) -> dict:
    """What was evaluated: equal identities mean the same evaluation (the run is skipped)."""
    prov = json.dumps(store.provenance, sort_keys=True)
    return {
        "format": RESULT_FORMAT,
        "model_id": ckpt.config.get("_name_or_path") or str(ckpt.path),
        "checkpoint": ckpt.identity(),
        "head": None if cfg.head is None else {"path": str(Path(cfg.head).resolve()), "sha256": sha256_file(cfg.head)},
        "cache": {"url": store.url, "provenance_sha256": hashlib.sha256(prov.encode()).hexdigest(),
                  "split": cfg.split, "items": n_items},
        "parameters": {"num_samples": cfg.num_samples, "steps": cfg.steps, "seed": cfg.seed, "dtype": cfg.dtype,
                       **guidance_options(cfg),  # the 1.5 options only when set: R1 metadata unchanged
                       **({"skip_bad_samples": True} if cfg.skip_bad_samples else {})},
    }


def run_info(device: torch.device) -> dict:
    """How it was evaluated (not part of the identity)."""
    import transformers

    return {"code_version": code_version(), "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def check_existing(out: Path, meta: dict, force: bool) -> dict | None:
    """The existing result when it is this evaluation (skip); refuse to replace another one."""
    if not out.is_file() or force:
        return None
    old = json.loads(out.read_text())
    old_id = {k: v for k, v in old.get("metadata", {}).items() if k != "run"}
    if old_id == meta:
        return old
    changed = sorted(k for k in set(meta) | set(old_id) if meta.get(k) != old_id.get(k))
    raise FileExistsError(f"{out} holds another evaluation (differs in {', '.join(changed)}); "
                          "write to a new --out or pass --force to replace it")


def check_pairings(cfg: EvalConfig, store: Store, ckpt: AlpamayoCheckpoint) -> None:
    """The checkpoint must be the store's; a --head must fit the checkpoint and have been trained on a
    store built the same way (processor, prefix mode, pixels, schema): refused naming what differs."""
    notes = []
    try:
        check_store_checkpoint(store, ckpt)
    except ValueError as exc:
        if not cfg.allow_store_mismatch:
            raise ValueError(f"{exc}, or --allow-store-mismatch to evaluate with it anyway") from None
        notes.append(str(exc).split("; pass the checkpoint")[0])
    if cfg.head:
        diff = check_head_pairing(check_head_file(cfg.head), cfg.head, ckpt, store)
        if diff and not cfg.allow_store_mismatch:
            raise ValueError(f"--head {cfg.head} was trained on a store built otherwise than {store.url}: "
                             f"{'; '.join(diff)} (its training store vs this one); pass --allow-store-mismatch "
                             "to evaluate it anyway")
        notes += [f"--head trained with {d} (its training store vs this one)" for d in diff]
    for n in notes:
        print(f"head-eval: note: --allow-store-mismatch: {n}", file=sys.stderr)


def eval_ram_plan(store: Store, indices: list[int], cfg: EvalConfig, ckpt: AlpamayoCheckpoint,
                  device: torch.device) -> dict[str, float]:
    """Host bytes at the peak: a batch of K/V read (kv dtype), collated and padded (x2), and on a CPU
    device the head's weights (the loaded state and the built head)."""
    from .memory import DTYPE_BYTES, count_params

    s = store.spec
    L = bucket_len(max(store.manifest(i)["prefix_len"] for i in indices))
    per = s.num_layers * 2 * s.num_kv_heads * L * s.head_dim * s.torch_dtype.itemsize
    plan = {"batch": 3 * min(cfg.batch_size, len(indices)) * per}
    if device.type == "cpu":
        plan["head weights"] = 2 * count_params(ckpt.head_config())[0] * DTYPE_BYTES[cfg.dtype]
    return plan


def read_chunk(store: Store, chunk: list[int], skip_bad: bool, skipped: dict) -> tuple[list[int], list]:
    """Read a batch's samples; a damaged one is refused naming it, or with `skip_bad` left out (into `skipped`)."""
    kept, cached = [], []
    for j in chunk:
        try:
            cached.append(store.read(j, with_hidden=False))
            kept.append(j)
        except SampleReadError as exc:
            if not skip_bad:
                raise StoreError(f"{exc}; or pass --skip-bad-samples to evaluate without it") from exc
            skipped[exc.key or store.manifest(j)["key"]] = exc.reason or str(exc)
    return kept, cached


@torch.no_grad()
def predict(head, batch, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled actions (B, K, 64, 2) -> xyz (B, K, 64, 3) and yaw rotations (B, K, 64, 3, 3) in the ego frame at t0."""
    B, K = actions.shape[:2]
    hx = batch.hist_xyz.float().repeat_interleave(K, 0)
    hr = batch.hist_rot.float().repeat_interleave(K, 0)
    xyz, rot = head.action_space.action_to_traj(actions.flatten(0, 1).float(), hx, hr)
    return xyz.view(B, K, *xyz.shape[1:]), rot.view(B, K, *rot.shape[1:])


def evaluate(cfg: EvalConfig) -> dict:
    cfg.validate()
    store = Store.open(cfg.cache, skip_damaged=cfg.skip_bad_samples)
    indices = split_indices(store, None if cfg.split == "all" else cfg.split)[: cfg.max_items]
    if not indices:
        raise ValueError(f"{cfg.cache}: no samples in split {cfg.split!r}")
    ckpt_path = cfg.checkpoint or store.provenance.get("checkpoint", {}).get("path")
    if not ckpt_path:
        raise ValueError("the store records no checkpoint path; pass --checkpoint")
    ckpt = AlpamayoCheckpoint.open(ckpt_path, vlm_base=cfg.vlm_base)
    check_pairings(cfg, store, ckpt)
    meta = identity(cfg, store, ckpt, len(indices))
    out = Path(cfg.out)
    old = check_existing(out, meta, cfg.force)
    if old is not None:
        print(f"head-eval: {out} is up to date (same checkpoint, head, cache and parameters): skipped")
        return old

    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    check_host_ram(eval_ram_plan(store, indices, cfg, ckpt, device), "lower --batch-size")
    state = load_head_file(cfg.head)[0] if cfg.head else ckpt.head_state_dict()
    head = head_from_state(ckpt.head_config(), state, dtype, device).eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rows: list[dict] = []
    skipped = {f"manifest {k}": v for k, v in store.damaged_manifests.items()}
    for i in tqdm(range(0, len(indices), cfg.batch_size), desc="head-eval", unit="batch"):
        chunk, cached = read_chunk(store, indices[i:i + cfg.batch_size], cfg.skip_bad_samples, skipped)
        if not chunk:
            continue
        batch = collate([sample_item(s) for s in cached]).to(device)
        if guidance_options(cfg):  # Alpamayo 1.5: no-route prompt and/or guidance (head_trainer/guided_eval.py)
            actions = sample_guided(head, store, cached, batch, cfg, gen)
        else:
            actions = head.sample_actions(batch.prefix, cfg.num_samples, cfg.steps, gen)  # (B, K, 64, 2)
        pred, pred_rot = predict(head, batch, actions)
        gt_rot = torch.stack([torch.from_numpy(s.ego_future_rot) for s in cached])  # (B, 64, 3, 3)
        m = trajectory_metrics(pred.cpu(), batch.fut_xyz.cpu(), pred_rot.cpu(), gt_rot)
        for b, j in enumerate(chunk):
            man = store.manifest(j)
            kappa = float(man["curvature"].get("future_signed_peak_kappa", 0.0))
            rows.append({
                "key": man["key"], "clip_id": man["clip_id"], "t0_us": man["t0_us"],
                "camera_config": man["camera_config"], "curvature": man["curvature"], "bin": curvature_bin(kappa),
                "metrics": {k: float(v[b]) for k, v in m.items()},
                "pred_xy": pred[b, :, :, :2].cpu().round(decimals=3).tolist(),  # (K, 64, 2) x fwd, y left
                "gt_xy": batch.fut_xyz[b, :, :2].cpu().round(decimals=3).tolist(),  # (64, 2)
            })
    if not rows:
        raise ValueError(f"{cfg.cache}: every sample of split {cfg.split!r} is damaged ({len(skipped)} skipped)")
    by_bin = summarize([{**r["metrics"], "bin": r["bin"]} for r in rows])
    summary = {k: v for k, v in by_bin["all"].items() if k != "straight_bias"}
    summary["straight_bias"] = by_bin.get("curved", {}).get("straight_bias")
    label = cfg.label or ("baseline" if cfg.head is None else Path(cfg.head).resolve().parent.name)
    result = {"metadata": {**meta, "run": run_info(device)}, "label": label, "summary": summary, "by_bin": by_bin,
              "per_sample": rows, "config": asdict(cfg)}
    if cfg.skip_bad_samples:
        result["skipped_samples"] = dict(sorted(skipped.items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(EvalConfig, argv, "head-eval", __doc__.split("\n\n")[0], ("cache", "out"))
    try:
        result = evaluate(cfg)
        if cfg.live:
            from .live import run_live

            result = run_live(cfg, result)
        if cfg.plot:
            from .plots import plot_comparison

            results = ([json.loads(Path(cfg.baseline).read_text())] if cfg.baseline else []) + [result]
            plot_comparison(results, cfg.plot, store_url=cfg.cache)
            print(f"head-eval: plot written to {cfg.plot}")
    except user_errors() as exc:
        print(f"head-eval: error: {exc}", file=sys.stderr)
        return 2
    s = result["summary"]
    sb = s.get("straight_bias")
    print(f"head-eval [{result['label']}] {len(result['per_sample'])} samples: "
          + ", ".join(f"{k}={s[k]:.3f}" for k in SUMMARY_KEYS if s.get(k) is not None)
          + (f", straight_bias={sb:.2f}" if sb is not None else ""))
    if result.get("skipped_samples"):
        print(f"head-eval: skipped {len(result['skipped_samples'])} damaged samples (--skip-bad-samples): "
              + "; ".join(f"{k}: {v}" for k, v in result["skipped_samples"].items()), file=sys.stderr)
    print(f"head-eval: results in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
