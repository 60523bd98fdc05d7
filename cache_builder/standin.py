"""standin-vlm: a STAND-IN for the released VLM on the embedded default (tiny checkpoint + synthetic world).

    standin-vlm pretrain --dataset cache/demo/world --checkpoint cache/demo/tiny/alpamayo --out cache/demo/standin
    standin-vlm probe cache/demo/store_4cam          # ridge probe: prefix -> future signed peak curvature

The tiny checkpoint's weights are random, so its cached prefix carries nothing about the road and no
head can learn to turn from it. The real Alpamayo-R1 VLM needs no such step; on the embedded default
this verb stands in for the release's perception: it briefly trains the tiny VLM's vision tower
(the mergers of `vlm.model.visual.*`; patch embedding and blocks stay as they are) so that each
camera image's merged tokens predict the road's future curvature profile, seen from that camera. The
text model, embeddings, lm_head and the head are copied unchanged. The result is a checkpoint
directory with the release's key names, shards and index; `cache-build` reads it like any other.

Training is deterministic (fixed seed, fixed order, one thread count) and small: the t0 frame of
each camera of the selected clips, one linear read-out shared by all cameras (discarded afterwards),
full-batch Adam on a mean-squared error over 8 window means of the normalised GT curvature (64 steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from shared.checkpoint import INDEX_NAME, AlpamayoCheckpoint
from shared.images import preprocess_images

from .cache_build import gt_action

STANDIN_NOTE = "stand-in VLM for the embedded default (vision tower pretrained on the synthetic world); not a release"
N_TARGETS = 8  # window means of the 64-step curvature channel


@dataclass
class PretrainConfig:
    dataset: str  # synthetic world (or any local PhysicalAI-AV copy)
    checkpoint: str  # base checkpoint directory (the tiny one)
    out: str  # new checkpoint directory
    split: str = "train"  # clips of this split are used ('all' = every clip)
    cameras: str = "full"  # camera config whose images are trained on
    steps: int = 400  # optimiser steps
    lr: float = 2e-3  # Adam learning rate
    seed: int = 0  # weights of the read-out and the batch order
    overwrite: bool = False  # replace an existing out directory

    def validate(self) -> None:
        if self.steps < 1 or not self.lr > 0:
            raise ValueError("--steps must be >= 1 and --lr > 0")
        out = Path(self.out)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not Path(self.dataset).is_dir():
            raise ValueError(f"--dataset {self.dataset}: no such directory (write one with synth-world)")


def curvature_targets(action: np.ndarray) -> np.ndarray:
    """(64, 2) normalised GT action -> (N_TARGETS,) window means of its curvature channel."""
    return action[:, 1].reshape(N_TARGETS, -1).mean(1).astype(np.float32)


def collect(cfg: PretrainConfig, ckpt: AlpamayoCheckpoint) -> list[dict]:
    """Per sample: pixel patches of each camera's t0 frame, grid, camera slot, target."""
    from shared.data import iter_samples, open_dataset

    ds = open_dataset(cfg.dataset)
    clips = [c for c in ds.clip_ids() if cfg.split == "all" or ds.split_of(c) == cfg.split]
    if not clips:
        raise ValueError(f"{cfg.dataset}: no clips in split {cfg.split!r}")
    space = ckpt.action_space()
    out = []
    for s in tqdm(iter_samples(ds, clips, "default", cfg.cameras), total=len(clips), desc="standin: data"):
        frames = torch.as_tensor(s.images[:, -1])  # (n_cam, 3, H, W) uint8, t0 frame
        pix, grid = preprocess_images(frames)  # (n_cam * patches, 1536), (n_cam, 3)
        action, _ = gt_action(space, s)
        out.append({"pixels": pix.to(torch.bfloat16), "grid": grid, "n_cam": frames.shape[0],
                    "target": torch.from_numpy(curvature_targets(action))})
    return out


def merger_inputs(visual: torch.nn.Module) -> list[int]:
    """Which block's output feeds each merger: the deepstack mergers', then the final merger's (last block)."""
    return [*visual.deepstack_visual_indexes, len(visual.blocks) - 1]


@torch.no_grad()
def tower_features(visual: torch.nn.Module, data: list[dict]) -> None:
    """Adds each sample's frozen block outputs that feed the mergers: d['feats'][block] of shape
    (n_cam * patches, vision_hidden)."""
    wanted = sorted(set(merger_inputs(visual)))
    got: dict[int, torch.Tensor] = {}
    hooks = [visual.blocks[b].register_forward_hook(
        lambda m, i, o, b=b: got.__setitem__(b, o[0] if isinstance(o, tuple) else o)) for b in wanted]
    try:
        for d in tqdm(data, desc="standin: tower", unit="sample"):
            visual(d["pixels"].float(), grid_thw=d["grid"], return_dict=True)
            d["feats"] = {b: got[b].to(torch.bfloat16) for b in wanted}
    finally:
        for h in hooks:
            h.remove()


def pretrain_vision(visual: torch.nn.Module, data: list[dict], cfg: PretrainConfig) -> list[float]:
    """Train the tower's mergers in place (patch embedding and blocks stay frozen, so their outputs
    are computed once): each image's mean merged token, through a linear read-out, predicts its
    sample's curvature targets. The final merger feeds the image tokens; the deepstack mergers feed
    the features added to the first decoder layers. One read-out for every camera: the scene's
    curvature is written the same way whichever camera sees it, so pooling over images keeps it.
    Full-batch Adam (every image every step): the frozen features of a few hundred images fit in RAM."""
    torch.manual_seed(cfg.seed)
    tower_features(visual, data)
    mergers = [*visual.deepstack_merger_list, visual.merger]
    src = merger_inputs(visual)
    hidden = visual.merger.linear_fc2.out_features
    readouts = torch.nn.ModuleList(torch.nn.Linear(hidden, N_TARGETS) for _ in mergers)
    feats = {b: torch.cat([d["feats"][b] for d in data]).float() for b in set(src)}  # (n_img * patches, vh)
    target = torch.cat([d["target"].expand(d["n_cam"], -1) for d in data])  # (n_img, N_TARGETS)
    n_img = target.shape[0]
    params = [p for m in mergers for p in m.parameters()] + list(readouts.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    losses = []
    for m in mergers:
        m.train().requires_grad_(True)
    for _ in tqdm(range(cfg.steps), desc="standin: pretrain", unit="step"):
        loss = torch.zeros(())
        for m, r, f in zip(mergers, readouts, src):
            pooled = m(feats[f]).view(n_img, -1, hidden).mean(1)  # (n_img, hidden)
            loss = loss + torch.nn.functional.mse_loss(r(pooled), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item() / len(mergers))
    visual.eval().requires_grad_(False)
    return losses


def write_checkpoint(base: AlpamayoCheckpoint, replace: dict[str, torch.Tensor], out: Path, meta: dict) -> Path:
    """Copy `base` shard by shard with `replace`d tensors (cast to each key's stored dtype)."""
    unknown = sorted(set(replace) - set(base.weight_map))
    if unknown:
        raise ValueError(f"tensors not in {base.path}: {unknown[:5]}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("config.json", INDEX_NAME):
        shutil.copy2(base.path / name, tmp / name)
    for fname in sorted(set(base.weight_map.values())):
        tensors = load_file(str(base.path / fname))
        for k in tensors:
            if k in replace:
                tensors[k] = replace[k].detach().to("cpu", tensors[k].dtype).contiguous()
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
    (tmp / "STANDIN.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def pretrain(cfg: PretrainConfig) -> Path:
    from .vlm import load_vlm

    cfg.validate()
    torch.manual_seed(cfg.seed)
    base = AlpamayoCheckpoint.open(cfg.checkpoint)
    data = collect(cfg, base)
    vlm = load_vlm(base, torch.float32, "cpu")
    losses = pretrain_vision(vlm.model.visual, data, cfg)
    state = {f"vlm.model.visual.{k}": v for k, v in vlm.model.visual.state_dict().items()}
    meta = {"note": STANDIN_NOTE, "base_checkpoint": str(base.path), "dataset": str(Path(cfg.dataset).resolve()),
            "samples": len(data), "config": vars(cfg), "loss_first": losses[0], "loss_last": float(np.mean(losses[-20:]))}
    out = write_checkpoint(base, state, Path(cfg.out), meta)
    print(f"standin-vlm: {len(data)} samples, loss {losses[0]:.4f} -> {meta['loss_last']:.4f}; checkpoint {out}")
    return out


# ---------------------------------------------------------------------------- select
def straight_dominated(dataset: str, split: str = "train", sharp_every: int = 3) -> list[str]:
    """The stand-in release's training clips: every straight and gentle clip of `split` and every
    `sharp_every`-th sharp one (by the curve scan's peak |curvature| >= 0.05 1/m), in dataset order."""
    from shared.data import open_dataset

    from .curve_scan import scan

    ds = open_dataset(dataset)
    rows, _ = scan(ds, [c for c in ds.clip_ids() if ds.split_of(c) == split])
    out, n_sharp = [], 0
    for r in rows:
        c = r["clip_id"]
        if r["max_abs_kappa"] >= 0.05:
            n_sharp += 1
            if (n_sharp - 1) % sharp_every:
                continue
        out.append(c)
    return out


# ---------------------------------------------------------------------------- probe
def probe_peak_curvature(store_url: str, feature: str = "hidden-mean", alpha: float = 10.0,
                         train_split: str = "train", eval_split: str = "val", fit_store: str | None = None) -> dict:
    """cache-inspect's ridge probe with the target the stand-in is judged on: the GT future's signed
    peak curvature (1/m, the store's `future_signed_peak_kappa`). Fit on the train split (of
    `fit_store` when given: a store of the same camera config), R^2 on the held-out val split."""
    from shared.store import Store

    from .cache_inspect import _feature, ridge_fit

    stores = {train_split: Store.open(fit_store or store_url), eval_split: Store.open(store_url)}
    keys = {sp: [k for k in st.keys() if st.manifest(k)["split"] == sp] for sp, st in stores.items()}
    if len(keys[train_split]) < 3 or len(keys[eval_split]) < 2:
        raise ValueError(f"{store_url}: need >= 3 {train_split} and >= 2 {eval_split} samples (--fit-on a train store)")
    x = {sp: np.stack([_feature(stores[sp], k, feature) for k in ks]) for sp, ks in keys.items()}
    y = {sp: np.array([stores[sp].manifest(k)["curvature"]["future_signed_peak_kappa"] for k in ks])
         for sp, ks in keys.items()}
    w, b, mu, sd = ridge_fit(x[train_split], y[train_split], alpha)
    pred = (x[eval_split] - mu) / sd @ w + b
    ye = y[eval_split]
    r2 = 1 - float(((ye - pred) ** 2).sum()) / float(((ye - ye.mean()) ** 2).sum())
    return {"store": store_url, "fit_store": fit_store or store_url, "feature": feature, "target": "future_signed_peak_kappa", "alpha": alpha,
            "n_train": len(y[train_split]), "n_eval": len(ye), "r2": r2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="standin-vlm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("pretrain", help="write a stand-in checkpoint whose vision tower sees the road")
    sp.add_argument("--dataset", required=True, help="synthetic world (synth-world) or local PhysicalAI-AV copy")
    sp.add_argument("--checkpoint", required=True, help="base checkpoint directory (tiny-checkpoint's alpamayo/)")
    sp.add_argument("--out", required=True, help="new checkpoint directory")
    for f, d, h in (("split", "train", "clips of this split ('all' = every clip)"),
                    ("cameras", "full", "camera config trained on")):
        sp.add_argument(f"--{f}", default=d, help=h)
    for f, t, d, h in (("steps", int, 400, "full-batch optimiser steps"), ("lr", float, 2e-3, "Adam learning rate"),
                       ("seed", int, 0, "read-out initialisation")):
        sp.add_argument(f"--{f}", type=t, default=d, help=h)
    sp.add_argument("--overwrite", action="store_true", help="replace an existing out directory")
    sl = sub.add_parser("select", help="clip ids of a straight-dominated training set (one per line)")
    sl.add_argument("--dataset", required=True, help="dataset root")
    sl.add_argument("--split", default="train", help="clips of this split")
    sl.add_argument("--sharp-every", type=int, default=3, help="keep every N-th sharp clip (all others are kept)")
    sl.add_argument("--out", required=True, help="text file to write the clip ids to (for cache-build --clips @FILE)")
    sq = sub.add_parser("probe", help="ridge probe: cached prefix -> GT future signed peak curvature (R^2 on val)")
    sq.add_argument("stores", nargs="+", help="store paths (scored on their val split)")
    sq.add_argument("--fit-on", default=None, help="fit on this store's train split instead (same camera config)")
    sq.add_argument("--feature", default="hidden-mean", help="hidden-mean | hidden-last8 | v-last-mean")
    sq.add_argument("--alpha", type=float, default=10.0, help="ridge strength on standardised features")
    sq.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    a = vars(p.parse_args(argv))
    cmd = a.pop("cmd")
    try:
        if cmd == "pretrain":
            pretrain(PretrainConfig(**a))
            return 0
        if cmd == "select":
            if a["sharp_every"] < 1:
                raise ValueError("--sharp-every must be >= 1")
            clips = straight_dominated(a["dataset"], a["split"], a["sharp_every"])
            Path(a["out"]).write_text("".join(c + "\n" for c in clips))
            print(f"standin-vlm: {len(clips)} {a['split']} clips (every sharp clip but one in {a['sharp_every']} "
                  f"left out) -> {a['out']}")
            return 0
        res = [probe_peak_curvature(s, a["feature"], a["alpha"], fit_store=a["fit_on"]) for s in a["stores"]]
    except (ValueError, OSError, KeyError) as exc:
        print(f"standin-vlm: error: {exc}", file=sys.stderr)
        return 2
    for r in res:
        print(f"probe {r['store']}: ridge({r['feature']}) -> future signed peak curvature, "
              f"n_train {r['n_train']} n_val {r['n_eval']}: R^2 {r['r2']:.3f}")
    if a["json_out"]:
        Path(a["json_out"]).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
