"""head-eval --live: run the frozen VLM on a few evaluated samples instead of reading their cache.

For each sample the raw frames are read again from the dataset the store was built from, the prompt
is rebuilt (same mode and pixel path as the store's provenance), the VLM prefills it, and then the
same head samples trajectories from the cached prefix and from the live one with the same noise.
Reported: whether the rebuilt token ids equal the stored ones (teacher / given-cot; a rollout prefix
is generated text, so its stored ids are prefilled as they are), K/V and rope-delta agreement, and
the metrics of both, side by side. Agreement within the store's KV precision means the cache is what
the VLM computes; it needs the checkpoint's VLM weights, so it is meant for the GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from shared.checkpoint import AlpamayoCheckpoint, head_from_state, load_head_file
from shared.head import AlpamayoHead, KVPrefix
from shared.prompt import build_vlm_inputs
from shared.qwen_files import alpamayo_token_ids, load_processor
from shared.store import CachedSample, Store
from shared.vlm import load_vlm, prefill

from .metrics import trajectory_metrics


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


class LivePrefixer:
    """Rebuilds a stored sample's VLM input from the dataset and prefills it."""

    def __init__(self, store: Store, ckpt: AlpamayoCheckpoint, device: torch.device, dataset: str | None = None,
                 attn: str = "sdpa"):
        from shared.data import open_dataset

        prov = store.provenance
        self.mode = prov.get("prefix_mode", "teacher")
        self.pixels = prov.get("pixels", "inference")  # stores from before the option: the inference path
        proc_cfg = prov.get("processor", {})
        self.processor = load_processor(str(ckpt.vlm_base), min_pixels=proc_cfg.get("min_pixels", 163840),
                                        max_pixels=proc_cfg.get("max_pixels", 196608), local_files_only=True)
        self.image_pad = alpamayo_token_ids(self.processor.tokenizer)["image_pad"]
        self.ds = open_dataset(dataset or prov["dataset_root"])
        kv_dtype = getattr(torch, store.spec.kv_dtype)
        self.vlm = load_vlm(ckpt, torch.float32 if kv_dtype == torch.float32 else torch.bfloat16, device, attn)
        self.kv_dtype = kv_dtype

    def __call__(self, cached: CachedSample) -> tuple[torch.Tensor, torch.Tensor, int, bool | None]:
        """-> live K, V (layers, kv_heads, L, head_dim) in the store's dtype, rope delta, ids equal to the stored ones."""
        from shared.data import load_sample

        s = load_sample(self.ds, cached.clip_id, cached.t0_us, cached.camera_config)
        cot = cached.reasoning if self.mode == "given-cot" else None
        x = build_vlm_inputs(self.processor, s, mode=self.mode, cot=cot, pixels=self.pixels)
        ids = torch.as_tensor(cached.token_ids, dtype=torch.int64).view(1, -1)  # (1, L)
        same_ids = None if self.mode == "rollout" else bool(torch.equal(x["input_ids"], ids))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "mm_token_type_ids": (ids == self.image_pad).long(),
                 "pixel_values": x["pixel_values"].to(self.vlm.dtype), "image_grid_thw": x["image_grid_thw"]}
        pf = prefill(self.vlm, batch, ids.shape[1], keep_hidden=False)
        return (pf.keys[:, 0].to(self.kv_dtype), pf.values[:, 0].to(self.kv_dtype), int(pf.rope_deltas[0]),
                same_ids)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@torch.no_grad()
def live_agreement(store: Store, keys: list[str], head: AlpamayoHead, prefixer: LivePrefixer, *,
                   num_samples: int, steps: int, seed: int, device: torch.device) -> dict:
    """Per sample and summary: cached vs live prefix, and the metrics of trajectories sampled from each."""
    rows = []
    for i, key in enumerate(tqdm(keys, desc="head-eval --live", unit="sample")):
        c = store.read(key, with_hidden=False)
        k, v, delta, same_ids = prefixer(c)
        hist = [torch.from_numpy(a).float()[None].to(device) for a in (c.ego_history_xyz, c.ego_history_rot)]
        gt = torch.from_numpy(c.ego_future_xyz).float()[None]
        out = {}
        for name, (kk, vv, dd) in {"cached": (c.k, c.v, int(c.rope_delta)), "live": (k, v, delta)}.items():
            prefix = KVPrefix.collate([(kk.cpu(), vv.cpu(), c.prefix_len, dd)]).to(device)
            gen = torch.Generator(device=device).manual_seed(seed + i)  # the same noise for both prefixes
            pred = head.sample_trajectories(prefix, *hist, num_samples, steps, gen).cpu()  # (1, K, 64, 3)
            out[name] = (pred, {m: float(t[0]) for m, t in trajectory_metrics(pred, gt).items()})
        rows.append({
            "key": key, "prefix_len": c.prefix_len, "token_ids_equal": same_ids,
            "rope_delta_equal": delta == int(c.rope_delta),
            "k_max_abs_diff": float((k.float().cpu() - c.k.float()).abs().max()), "k_rel_diff": _rel(k.cpu(), c.k),
            "v_max_abs_diff": float((v.float().cpu() - c.v.float()).abs().max()), "v_rel_diff": _rel(v.cpu(), c.v),
            "traj_max_abs_diff_m": float((out["live"][0] - out["cached"][0]).abs().max()),
            "metrics_cached": out["cached"][1], "metrics_live": out["live"][1],
        })
    names = list(rows[0]["metrics_cached"]) if rows else []
    mean = lambda which, m: sum(r[which][m] for r in rows) / len(rows)  # noqa: E731
    summary = {
        "samples": len(rows),
        "token_ids_equal": sum(bool(r["token_ids_equal"]) for r in rows if r["token_ids_equal"] is not None),
        "token_ids_checked": sum(r["token_ids_equal"] is not None for r in rows),
        "rope_delta_equal": sum(r["rope_delta_equal"] for r in rows),
        "k_max_abs_diff": max((r["k_max_abs_diff"] for r in rows), default=0.0),
        "v_max_abs_diff": max((r["v_max_abs_diff"] for r in rows), default=0.0),
        "kv_max_rel_diff": max((max(r["k_rel_diff"], r["v_rel_diff"]) for r in rows), default=0.0),
        "traj_max_abs_diff_m": max((r["traj_max_abs_diff_m"] for r in rows), default=0.0),
        "metrics": {m: {"cached": mean("metrics_cached", m), "live": mean("metrics_live", m),
                        "max_abs_diff": max(abs(r["metrics_live"][m] - r["metrics_cached"][m]) for r in rows)}
                    for m in names},
    }
    return {"summary": summary, "per_sample": rows}


def format_table(live: dict) -> str:
    s = live["summary"]
    lines = [f"live check on {s['samples']} samples: token ids equal {s['token_ids_equal']}/{s['token_ids_checked']}, "
             f"rope delta equal {s['rope_delta_equal']}/{s['samples']}, K/V max |diff| {s['k_max_abs_diff']:.3g}/"
             f"{s['v_max_abs_diff']:.3g} (rel {s['kv_max_rel_diff']:.3g}), trajectories max |diff| "
             f"{s['traj_max_abs_diff_m']:.3g} m",
             f"{'metric':<20}{'cached':>12}{'live':>12}{'max |diff|':>14}"]
    for m, d in s["metrics"].items():
        lines.append(f"{m:<20}{d['cached']:>12.4f}{d['live']:>12.4f}{d['max_abs_diff']:>14.3g}")
    return "\n".join(lines)


def run_live(cfg, result: dict) -> dict:
    """The --live part of head-eval: the first `cfg.live` evaluated samples; adds result['live'] and rewrites cfg.out."""
    store = Store.open(cfg.cache)
    ckpt = AlpamayoCheckpoint.open(cfg.checkpoint or store.provenance["checkpoint"]["path"], vlm_base=cfg.vlm_base)
    device = _device(cfg.device)
    state = load_head_file(cfg.head)[0] if cfg.head else ckpt.head_state_dict()
    head = head_from_state(ckpt.head_config(), state, getattr(torch, cfg.dtype), device).eval()
    keys = [r["key"] for r in result["per_sample"]][: cfg.live]
    prefixer = LivePrefixer(store, ckpt, device, cfg.dataset)
    result = dict(result, live=live_agreement(store, keys, head, prefixer, num_samples=cfg.num_samples,
                                              steps=cfg.steps, seed=cfg.seed, device=device))
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(format_table(result["live"]))
    return result
