"""head-eval: sample trajectories from cached prefixes and score them against ground truth.

    head-eval --cache cache/demo/store --out runs/demo/eval_baseline.json                 # released head
    head-eval --cache cache/demo/store --head runs/demo/head.safetensors --out runs/demo/eval_ft.json \
              --baseline runs/demo/eval_baseline.json --plot runs/demo/compare.png

The result JSON carries its metadata (checkpoint, head file hash, cache provenance, split,
sampler parameters); when a result with identical metadata already exists the evaluation is
skipped (use --force to recompute), so a benchmark re-run only computes what changed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from shared.checkpoint import AlpamayoCheckpoint, head_from_state, load_head_file, sha256_file
from shared.cli import config_from_args, user_errors
from shared.store import Store

from .data import collate, sample_item, split_indices
from .guided_eval import guidance_options, sample_guided
from .head_train import resolve_device
from .metrics import summarize, trajectory_metrics

RESULT_FORMAT = "alpamayo-headtune/eval/v1"


@dataclass
class EvalConfig:
    cache: str  # cache store to evaluate on
    out: str  # result JSON
    head: str | None = None  # fine-tuned head file (default: the checkpoint's released head = baseline)
    label: str | None = None  # name shown in plots (default: baseline / the head file's run name)
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
    force: bool = False  # recompute even when a result with the same metadata exists
    baseline: str | None = None  # another result JSON to compare against in --plot
    plot: str | None = None  # write a PNG comparing baseline (if any) and this result
    navigation: str = "as-built"  # Alpamayo 1.5 stores: as-built (the stored route) | none (the unguided prefix)
    guidance_weight: float = 1.0  # Alpamayo 1.5: classifier-free guidance w (1 = off; official nav demo 1.5)
    noise_temperature: float = 1.0  # Alpamayo 1.5: initial-noise scale (release 1.0; official nav demo 0.6)
    live: int = 0  # also run the VLM on this many of the samples instead of reading their cache; report agreement (GPU)
    dataset: str | None = None  # --live: the dataset the store was built from (default: its provenance)

    def validate(self) -> None:
        if self.num_samples < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("--num-samples, --steps and --batch-size must be >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype {self.dtype!r}: use float32 or bfloat16")
        if self.head and not Path(self.head).is_file():
            raise ValueError(f"--head {self.head}: no such file (train one with head-train)")
        if self.live < 0:
            raise ValueError(f"--live {self.live}: must be >= 0")
        if self.baseline and not Path(self.baseline).is_file():
            raise ValueError(f"--baseline {self.baseline}: no such result file (run head-eval without --head first)")
        guidance_options(self)


def metadata(cfg: EvalConfig, store: Store, ckpt: AlpamayoCheckpoint, n_items: int) -> dict:
    prov = json.dumps(store.provenance, sort_keys=True)
    return {
        "format": RESULT_FORMAT,
        "model_id": ckpt.config.get("_name_or_path") or str(ckpt.path),
        "checkpoint": ckpt.identity(),
        "head": None if cfg.head is None else {"path": str(Path(cfg.head).resolve()), "sha256": sha256_file(cfg.head)},
        "cache": {"url": store.url, "provenance_sha256": hashlib.sha256(prov.encode()).hexdigest(),
                  "split": cfg.split, "items": n_items},
        "parameters": {"num_samples": cfg.num_samples, "steps": cfg.steps, "seed": cfg.seed, "dtype": cfg.dtype,
                       **guidance_options(cfg)},  # the 1.5 options only when set: R1 metadata unchanged
    }


def evaluate(cfg: EvalConfig) -> dict:
    cfg.validate()
    store = Store.open(cfg.cache)
    indices = split_indices(store, None if cfg.split == "all" else cfg.split)[: cfg.max_items]
    if not indices:
        raise ValueError(f"{cfg.cache}: no samples in split {cfg.split!r}")
    ckpt_path = cfg.checkpoint or store.provenance.get("checkpoint", {}).get("path")
    if not ckpt_path:
        raise ValueError("the store records no checkpoint path; pass --checkpoint")
    ckpt = AlpamayoCheckpoint.open(ckpt_path, vlm_base=cfg.vlm_base)
    meta = metadata(cfg, store, ckpt, len(indices))
    out = Path(cfg.out)
    if out.is_file() and not cfg.force:
        old = json.loads(out.read_text())
        if old.get("metadata") == meta:
            print(f"head-eval: {out} is up to date (same checkpoint, head, cache and parameters): skipped")
            return old

    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    state = load_head_file(cfg.head)[0] if cfg.head else ckpt.head_state_dict()
    head = head_from_state(ckpt.head_config(), state, dtype, device).eval()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    rows: list[dict] = []
    per_metric: dict[str, list[torch.Tensor]] = {}
    for i in tqdm(range(0, len(indices), cfg.batch_size), desc="head-eval", unit="batch"):
        chunk = indices[i:i + cfg.batch_size]
        read = [store.read(j, with_hidden=False) for j in chunk]
        batch = collate([sample_item(s) for s in read]).to(device)
        if guidance_options(cfg):  # Alpamayo 1.5: no-route prompt and/or guidance (head_trainer/guided_eval.py)
            pred = sample_guided(head, store, read, batch, cfg, gen)
        else:
            pred = head.sample_trajectories(batch.prefix, batch.hist_xyz, batch.hist_rot, cfg.num_samples,
                                            cfg.steps, gen)  # (B, K, 64, 3)
        m = trajectory_metrics(pred.cpu(), batch.fut_xyz.cpu())
        for k, v in m.items():
            per_metric.setdefault(k, []).append(v)
        for b, j in enumerate(chunk):
            man = store.manifest(j)
            rows.append({
                "key": man["key"], "clip_id": man["clip_id"], "t0_us": man["t0_us"],
                "camera_config": man["camera_config"], "curvature": man["curvature"],
                "metrics": {k: float(v[b]) for k, v in m.items()},
                "pred_xy": pred[b, :, :, :2].cpu().round(decimals=3).tolist(),  # (K, 64, 2)
                "gt_xy": batch.fut_xyz[b, :, :2].cpu().round(decimals=3).tolist(),  # (64, 2)
            })
    summary = summarize({k: torch.cat(v) for k, v in per_metric.items()})
    label = cfg.label or ("baseline" if cfg.head is None else Path(cfg.head).resolve().parent.name)
    result = {"metadata": meta, "label": label, "summary": summary, "per_sample": rows, "config": asdict(cfg)}
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
    print(f"head-eval [{result['label']}] {len(result['per_sample'])} samples: "
          + ", ".join(f"{k}={s[k]:.3f}" for k in ("min_ade", "ade", "fde", "min_fde")))
    print(f"head-eval: results in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
