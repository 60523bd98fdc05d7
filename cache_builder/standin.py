"""standin-vlm: a STAND-IN for the released VLM on the embedded default (tiny checkpoint + synthetic world).

    standin-vlm pretrain --dataset cache/demo/world --checkpoint cache/demo/tiny/alpamayo --out cache/demo/standin
    standin-vlm probe cache/demo/store_4cam     # ridge probe: K/V at the image tokens -> future signed peak curvature

The tiny checkpoint's weights are random, so its cached prefix carries nothing about the road and no
head can learn to turn from it. The real Alpamayo-R1 VLM needs no such step; on the embedded default
this verb stands in for the release's perception. Training the random tower's mergers on the few
demo images did not generalise (held-out probe R^2 -0.3), so the stand-in is set by hand instead.
Vision tower (`set_road_features`): patch embedding = road-ness of each patch (asphalt vs grass and
sky, from G - R), position table = a one-hot road-map bin (3 rows x 4 columns), block 0's MLP fires
"road in bin j", block 1 averages over the image (uniform attention) with two closed-form ridge
read-outs of that road map as its values (`fit_readout`: each image's mean road map -> its sample's
2 window means of the GT curvature), deepstack mergers = zero; the merger writes the read-outs
(channels PRED) and the road map into every merged token. Text model (`set_value_readout`): each
layer's v_proj copies PRED into the first N_READ dims of every KV head (the side map at V_GAIN, the
front map at FRONT_V_GAIN), so the values the head attends to carry the read-outs at about the
curvature's own scale (the random v_proj passed them on at ~0.01 across samples: a probe found
them, no head fine-tuned for a few hundred steps did); the text embeddings' PRED channels are zero.
Every other weight (the rest of the text model, lm_head, the head) is copied unchanged.

The release mechanism being reproduced (shared/docs/seed-experiments.md): with four cameras the real
model turns, front-only it goes straight, although the front camera sees the curve. The tower does
not know which camera an image comes from; of its two read-outs the side map is fit on the side
and tele cameras' images, the front map on the front camera's. The front map is anti-correlated
with the curve on the cross cameras (about -0.5 on the demo world), so over four cameras it mostly
averages out, and it reaches the values at a quarter of the side map's gain: a head trained on four
cameras leans on the side map. Front-only the side map says little and that head under-steers,
although the front map carries the curve (the probe sees it); fine-tuning on front-only caches
teaches the head to read it. Deterministic: no random state, two least-squares solves. The result
is a checkpoint directory with the release's key names, shards and index; `cache-build` reads it
like any other.
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
from shared.sample import FRONT_CAMERA

from .cache_build import gt_action

STANDIN_NOTE = ("stand-in VLM for the embedded default (hand-set road-map vision tower; front- and side-camera ridge "
                "read-outs fit on the synthetic world, copied into the text layers' values, the front one at a "
                "quarter of the gain); not a release")
N_TARGETS = 2  # window means (3.2 s each) of the 64-step curvature channel
MAPS = ("front", "side")  # two read-outs: fit on the front camera's images / on the side and tele cameras'
N_READ = len(MAPS) * N_TARGETS  # read-out channels: map m, target j -> channel m * N_TARGETS + j
ROWS = (0.55, 0.7)  # road-map bins: vertical image fractions (2 cuts -> 3 rows) ...
COLS = 4  # ... x 4 columns
N_BINS = (len(ROWS) + 1) * COLS  # 12 road-map units
# vision residual channels: 0 road-ness, 1..N_BINS bin indicator, then +-CONST, then the units (A), then the
# image-mean read-outs (B)
CH_CONST = N_BINS + 1
CH_A = CH_CONST + 2
CH_B = CH_A + N_BINS
PRED = slice(0, N_READ)  # merged-token channels carrying the image's curvature read-outs ...
ROAD = slice(N_READ, N_READ + N_BINS)  # ... and its road map
ALPHA = 0.1  # ridge strength of the read-outs
V_GAIN = 4.0  # the text layers' values: dims 0..N_READ-1 of every KV head = gain x the normalised PRED channels ...
FRONT_V_GAIN = 1.0  # ... at V_GAIN for the side map, FRONT_V_GAIN for the front map (see module doc)
IND, CONST, SLOPE, THRESH = 2.0, 6.0, 5.0, 1.5  # indicator, LayerNorm ballast, unit slope and threshold
EPS_A, OFF, GAIN, FILL = 0.1, 6.0, 2.0, 1.0  # unit scale, GELU's linear-regime offset, read-out gain, ballast
READ_SCALE = 0.25  # block 1 writes this fraction of the read-out: keeps the merger's LayerNorm and GELU near-linear

@dataclass
class PretrainConfig:
    dataset: str  # synthetic world (or any local PhysicalAI-AV copy)
    checkpoint: str  # base checkpoint directory (the tiny one)
    out: str  # new checkpoint directory
    split: str = "train"  # clips of this split are used ('all' = every clip)
    cameras: str = "full"  # camera config whose images are trained on
    alpha: float = ALPHA  # ridge strength of the read-out (on standardised road maps)
    value_gain: float = V_GAIN  # the text layers' values carry the side read-out at this gain (0 = random v_proj kept)
    front_value_gain: float = FRONT_V_GAIN  # ... and the front read-out at this one
    overwrite: bool = False  # replace an existing out directory

    def validate(self) -> None:
        if not self.alpha > 0 or not self.value_gain >= 0 or not self.front_value_gain >= 0:
            raise ValueError(f"--alpha must be > 0 and --value-gain, --front-value-gain >= 0 (got {self.alpha}, "
                             f"{self.value_gain}, {self.front_value_gain})")
        if self.cameras == "front-only":
            raise ValueError("--cameras front-only: the side read-out needs the side and tele cameras (use full)")
        out = Path(self.out)
        if out.exists() and any(out.iterdir()) and not self.overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if not Path(self.dataset).is_dir():
            raise ValueError(f"--dataset {self.dataset}: no such directory (write one with synth-world)")


def curvature_targets(action: np.ndarray) -> np.ndarray:
    """(64, 2) normalised GT action -> (N_TARGETS,) window means of its curvature channel."""
    return action[:, 1].reshape(N_TARGETS, -1).mean(1).astype(np.float32)


def collect(cfg: PretrainConfig, ckpt: AlpamayoCheckpoint) -> list[dict]:
    """Per sample: pixel patches of every frame of every camera (the cache shows the head all of them:
    a read-out fit on the t0 frame alone was anti-correlated with the curve on the front camera's
    earlier frames, and the image-token mean cancelled), grid, camera of each image, target."""
    from shared.data import iter_samples, open_dataset

    ds = open_dataset(cfg.dataset)
    clips = [c for c in ds.clip_ids() if cfg.split == "all" or ds.split_of(c) == cfg.split]
    if not clips:
        raise ValueError(f"{cfg.dataset}: no clips in split {cfg.split!r}")
    space = ckpt.action_space()
    out = []
    for s in tqdm(iter_samples(ds, clips, "default", cfg.cameras), total=len(clips), desc="standin: data"):
        n_frames = s.images.shape[1]
        frames = torch.as_tensor(s.images).flatten(0, 1)  # (n_cam * n_frames, 3, H, W) uint8, camera-major
        pix, grid = preprocess_images(frames)  # (n_img * patches, 1536), (n_img, 3)
        action, _ = gt_action(space, s)
        out.append({"pixels": pix.to(torch.bfloat16), "grid": grid, "n_img": frames.shape[0],
                    "cameras": tuple(c for c in s.camera_names for _ in range(n_frames)),
                    "target": torch.from_numpy(curvature_targets(action))})
    return out


# ---------------------------------------------------------------------------- the stand-in's perception
@torch.no_grad()
def set_road_features(visual: torch.nn.Module) -> None:
    """Hand-set the tower up to the read-out, which `fit_readout` writes.

    patch embedding channel 0 = road-ness of the patch, 1 - (G - R) / 25 in pixel units (asphalt and
    lane lines ~1, grass ~-1, sky < 0; the world's per-clip colour offsets cancel in G - R); the
    position table puts IND in the channel of the patch's road-map bin and +-CONST in two more, so
    every LayerNorm is nearly the same affine map. Block 0: no attention; its MLP unit j fires
    (~2, else ~0) when the patch is road and in bin j, written at EPS_A into channels A. Block 1: no
    MLP; its attention has q = k = 0, i.e. it averages over the image's patches, and its values are
    the ridge read-out of the (normalised) units, written into channels B: every patch of an image
    then holds that image's prediction. The merger passes B through (GELU in its linear regime) into
    merged-token channels PRED at GAIN, and the units into ROAD, +-FILL elsewhere; the deepstack
    mergers output zero."""
    d = visual.patch_embed.proj.weight.shape[0]
    assert d >= CH_B + N_READ, "vision hidden too small for the road map"
    for p in visual.parameters():
        p.zero_()
    for m in visual.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.fill_(1.0)
    w = visual.patch_embed.proj.weight  # (d, 3, 2, 16, 16)
    n = w[0, 0].numel()
    w[0, 0], w[0, 1] = 127.5 / 25 / n, -127.5 / 25 / n  # pixels are (p - 127.5) / 127.5
    visual.patch_embed.proj.bias[0] = 1.0
    side = visual.num_grid_per_side
    frac = torch.arange(side) / (side - 1)
    row = torch.bucketize(frac, torch.tensor(ROWS), right=True)  # (side,)
    col = torch.clamp((frac * COLS).long(), max=COLS - 1)
    table = visual.pos_embed.weight.view(side, side, d)
    table[:, :, CH_CONST] = CONST
    table[:, :, CH_CONST + 1] = -CONST
    bins = row[:, None] * COLS + col[None, :]  # (side, side)
    table.view(-1, d)[torch.arange(side * side), 1 + bins.reshape(-1)] = IND
    mlp = visual.blocks[0].mlp
    for j in range(N_BINS):
        mlp.linear_fc1.weight[j, 0] = mlp.linear_fc1.weight[j, 1 + j] = SLOPE
        mlp.linear_fc1.bias[j] = -SLOPE * THRESH
        mlp.linear_fc2.weight[CH_A + j, j] = EPS_A
    visual.blocks[1].attn.proj.weight[CH_B:CH_B + N_READ, :N_READ] = torch.eye(N_READ)
    m = visual.merger
    fc1 = m.linear_fc1.weight.view(-1, 4, d)  # (units, 4 merged patches, d)
    for k in range(N_READ):
        fc1[k, :, CH_B + k] = 0.25
    for j in range(N_BINS):  # the road map too (sparse, small): merged channels ROAD
        fc1[N_READ + j, :, CH_A + j] = 0.25
    m.linear_fc1.bias[:N_READ + N_BINS] = OFF
    m.linear_fc2.weight[PRED, :N_READ] = GAIN * torch.eye(N_READ)
    m.linear_fc2.weight[ROAD, N_READ:N_READ + N_BINS] = torch.eye(N_BINS)
    m.linear_fc2.bias[PRED] = -GAIN * OFF
    m.linear_fc2.bias[ROAD] = -OFF
    rest = m.linear_fc2.bias.numel() - ROAD.stop
    m.linear_fc2.bias[ROAD.stop:] = FILL * torch.tensor([(-1.0) ** i for i in range(rest)])


@torch.no_grad()
def set_value_readout(language_model: torch.nn.Module, gain: float = V_GAIN, front_gain: float = FRONT_V_GAIN) -> None:
    """Every text layer's v_proj: the first N_READ dims of each KV head read the (RMS-normalised)
    channels PRED (the side map's at `gain`, the front map's at `front_gain`) and nothing else; the
    other value dims keep their random weights. The text
    embeddings' PRED channels are zeroed: only the image tokens (whose embeddings are the merged
    vision tokens) write those value dims, so the text (12 % of a front-only prefix, 4 % of a
    four-camera one) does not shift them by the prompt's length.

    Why: with the random v_proj (std 0.02) the read-out reached the values the expert attends to at
    ~0.01 across samples, against ~0.16 of constant: a ridge probe finds it, but a head fine-tuned
    for a few hundred steps does not (its loss stayed at the blank control's). Written at ~1 (the
    normalised curvature's own scale), a head learns to follow it within the demo's steps."""
    language_model.embed_tokens.weight[:, PRED] = 0.0  # text tokens leave those value dims (almost) empty
    for layer in language_model.layers:
        attn = layer.self_attn
        w = attn.v_proj.weight  # (kv_heads * head_dim, hidden)
        for h in range(w.shape[0] // attn.head_dim):
            rows = slice(h * attn.head_dim, h * attn.head_dim + N_READ)
            w[rows] = 0.0
            w[rows, PRED] = torch.diag(torch.tensor([front_gain if m == "front" else gain for m in MAPS
                                                     for _ in range(N_TARGETS)]))


@torch.no_grad()
def road_units(visual: torch.nn.Module, d: dict) -> torch.Tensor:
    """(n_img, N_BINS) the image mean of what block 1's attention reads: its LayerNorm'd channels A."""
    got = {}
    blk = visual.blocks[1]
    hook = blk.norm1.register_forward_hook(lambda mod, i, o: got.__setitem__("x", o))
    try:
        visual(d["pixels"].float(), grid_thw=d["grid"], return_dict=True)
    finally:
        hook.remove()
    return got["x"][:, CH_A:CH_A + N_BINS].reshape(d["n_img"], -1, N_BINS).mean(1)


@torch.no_grad()
def fit_readout(visual: torch.nn.Module, data: list[dict], cfg: PretrainConfig) -> dict:
    """Two ridges (closed form, deterministic) from each image's mean road map to its sample's
    curvature targets: the front map on the front camera's images, the side map on the side and tele
    cameras', each applied to every image (the tower does not know the camera). Written as block 1's
    attention values: the mean over an image's merged tokens of channel PRED[m * N_TARGETS + j] is then
    READ_SCALE * GAIN times map m's prediction of target j, divided by the merger LayerNorm's scale
    (~1.6, nearly constant thanks to the +-CONST ballast)."""
    from .cache_inspect import ridge_fit

    x = torch.cat([road_units(visual, d) for d in tqdm(data, desc="standin: road maps", unit="sample")]).double()
    y = torch.cat([d["target"].expand(d["n_img"], -1) for d in data]).double()
    front = torch.tensor([c == FRONT_CAMERA for d in data for c in d["cameras"]])
    qkv = visual.blocks[1].attn.qkv
    d = visual.patch_embed.proj.weight.shape[0]
    out = {"images": int(x.shape[0])}
    for m, rows in enumerate((front, ~front)):
        if not rows.any():
            raise ValueError(f"no {MAPS[m]}-camera images to fit the {MAPS[m]} read-out on")
        w, b, mu, sd = ridge_fit(x[rows].numpy(), y[rows].numpy(), cfg.alpha)  # pred = (x - mu) / sd @ w + b
        wt = READ_SCALE * torch.from_numpy(w / sd[:, None]).T  # (N_TARGETS, N_BINS) on raw unit means
        bt = READ_SCALE * torch.from_numpy(b - (mu / sd) @ w)  # (N_TARGETS,)
        fit = ((torch.from_numpy((x[rows].numpy() - mu) / sd @ w + b) - y[rows]) ** 2).mean() / y[rows].var()
        v = slice(2 * d + m * N_TARGETS, 2 * d + (m + 1) * N_TARGETS)  # v rows; q = k = 0: uniform attention
        qkv.weight[v, CH_A:CH_A + N_BINS] = wt.float()
        qkv.bias[v] = bt.float()
        out[f"{MAPS[m]}_fraction_unexplained"] = float(fit)
    return out


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
    base = AlpamayoCheckpoint.open(cfg.checkpoint)
    data = collect(cfg, base)
    vlm = load_vlm(base, torch.float32, "cpu")
    set_road_features(vlm.model.visual)
    fit = fit_readout(vlm.model.visual, data, cfg)
    if cfg.value_gain or cfg.front_value_gain:
        set_value_readout(vlm.model.language_model, cfg.value_gain, cfg.front_value_gain)
    state = {f"vlm.model.visual.{k}": v for k, v in vlm.model.visual.state_dict().items()}
    state |= {f"vlm.model.language_model.{k}": v for k, v in vlm.model.language_model.state_dict().items()
              if ".self_attn.v_proj." in k or k == "embed_tokens.weight"}
    meta = {"note": STANDIN_NOTE, "base_checkpoint": str(base.path), "dataset": str(Path(cfg.dataset).resolve()),
            "samples": len(data), "config": vars(cfg), **fit}
    out = write_checkpoint(base, state, Path(cfg.out), meta)
    print(f"standin-vlm: {len(data)} samples ({fit['images']} images); the front / side read-outs leave "
          f"{fit['front_fraction_unexplained']:.2f} / {fit['side_fraction_unexplained']:.2f} of the target variance "
          f"on their fit sets; checkpoint {out}")
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
IMAGE_FEATURE = "kv-image-mean"  # what the head reads: every layer's K and V, averaged over the image tokens


def image_kv_mean(st, key: str, feature: str = IMAGE_FEATURE) -> np.ndarray:
    """(layers * 2 * kv_heads * head_dim,) every layer's cached K and V averaged over the image-pad positions
    of the prefix (the tokens the stand-in's perception writes; the head attends to them)."""
    s = st.read(key, with_hidden=False)
    img = s.token_ids == image_pad_id(st)
    return torch.stack([s.k[:, :, img], s.v[:, :, img]], 1).float().mean(-2).reshape(-1).numpy()


def image_pad_id(st) -> int:
    """The image-pad token id of the store's processor (its tokenizer files are in the provenance's path)."""
    from transformers import AutoTokenizer

    path = st.provenance["processor"]["path"]
    if path not in _PAD_IDS:
        _PAD_IDS[path] = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<|image_pad|>")
    return _PAD_IDS[path]


_PAD_IDS: dict[str, int] = {}


def probe_peak_curvature(store_url: str, feature: str = "kv-image-mean", alpha: float = 10.0,
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
    x = {sp: np.stack([(image_kv_mean if feature == IMAGE_FEATURE else _feature)(stores[sp], k, feature) for k in ks])
         for sp, ks in keys.items()}
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
    for f, t, d, h in (("alpha", float, ALPHA, "ridge strength of the read-out"),
                       ("value-gain", float, V_GAIN, "the text layers' values carry the side read-out at this gain"),
                       ("front-value-gain", float, FRONT_V_GAIN, "... and the front read-out at this one")):
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
    sq.add_argument("--feature", default=IMAGE_FEATURE, help=f"{IMAGE_FEATURE} | hidden-mean | hidden-last8 | v-last-mean")
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
