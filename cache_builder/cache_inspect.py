"""cache-inspect: look inside a KV cache store without training anything.

    cache-inspect summary run1                      # samples, tokens, bytes, codecs, provenance
    cache-inspect ls run1 --split val --min-curvature 0.02
    cache-inspect verify run1                       # checksums, NaN/Inf, schema; exit 1 on failure
    cache-inspect verify run1 --drop-bad            # ... and un-commit damaged samples for cache-build --resume
    cache-inspect show run1 3 --out s3.png          # reasoning, trajectories, t0 thumbnails
    cache-inspect show run1 clip-0001@5100000:front-only   # by key: clip_id@t0_us:camera_config
    cache-inspect probe run1                        # does the frozen prefix carry the curve at all?

STORE is a name under cache/ (`run1`, `demo/store`: cache/demo/store unless ./demo/store is a store), or
any path / fsspec URL (s3://...; --storage-options for endpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.cli import OneLineParser, user_errors
from shared.store import Store, default_store_url, drop_samples


# ============================================================================ configs
@dataclass(frozen=True)
class StoreArg:
    store: str  # cache name (-> cache/<name>) or path / URL
    storage_options: str = ""  # JSON dict passed to fsspec, e.g. '{"endpoint_url": "http://..."}'

    def open(self, skip_damaged: bool = False) -> Store:
        try:
            so = json.loads(self.storage_options) if self.storage_options else None
        except json.JSONDecodeError as e:
            raise ValueError(f"--storage-options is not valid JSON: {e}") from None
        if so is not None and not isinstance(so, dict):
            raise ValueError("--storage-options must be a JSON object")
        return Store.open(default_store_url(self.store), storage_options=so, skip_damaged=skip_damaged)


@dataclass(frozen=True)
class SummaryConfig(StoreArg):
    as_json: bool = False  # print the summary as JSON


@dataclass(frozen=True)
class LsConfig(StoreArg):
    split: str | None = None  # keep only this split
    camera_config: str | None = None  # keep only this camera configuration
    min_curvature: float | None = None  # keep samples with curvature[curvature_stat] >= this
    curvature_stat: str = "max_abs"  # which curvature statistic --min-curvature applies to
    limit: int = 0  # print at most this many rows (0 = all)

    def validate(self) -> None:
        if self.limit < 0:
            raise ValueError("--limit must be >= 0")


@dataclass(frozen=True)
class VerifyConfig(StoreArg):
    quick: bool = False  # files and sizes only: skip reading arrays (checksums, NaN/Inf)
    drop_bad: bool = False  # un-commit the damaged samples found, so cache-build --resume rebuilds them


@dataclass(frozen=True)
class ShowConfig(StoreArg):
    sample: str = "0"  # sample key or integer index
    out: str | None = None  # write a PNG (trajectories + thumbnails) here


@dataclass(frozen=True)
class ProbeConfig(StoreArg):
    feature: str = "hidden-mean"  # hidden-mean | hidden-last8 | v-last-mean
    target: str = "yaw-change"  # yaw-change (rad over 6.4 s, signed) | mean-curvature (1/m, signed)
    alpha: float = 10.0  # ridge strength on standardised features
    train_split: str = "train"  # fit on this split
    eval_split: str = "val"  # report on this split
    max_samples: int = 0  # use at most this many samples per split (0 = all)

    def validate(self) -> None:
        if self.feature not in ("hidden-mean", "hidden-last8", "v-last-mean"):
            raise ValueError(f"--feature must be hidden-mean | hidden-last8 | v-last-mean, got {self.feature!r}")
        if self.target not in ("yaw-change", "mean-curvature"):
            raise ValueError(f"--target must be yaw-change | mean-curvature, got {self.target!r}")
        if not self.alpha > 0:
            raise ValueError("--alpha must be > 0")


# ============================================================================ commands
def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def cmd_summary(cfg: SummaryConfig) -> int:
    st = cfg.open()
    s = st.summary()
    if cfg.as_json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    spec = s["spec"]
    print(f"store        {s['url']}  (schema v{s['schema_version']})")
    print(f"samples      {s['samples']}   tokens {s['tokens']:,}  (L {s['prefix_len_min']}..{s['prefix_len_max']})")
    print(f"bytes        logical {_mb(s['bytes_logical'])}  on disk {_mb(s['bytes_stored'])}  ratio {s['ratio']:.2f}x")
    print(f"kv           {spec['num_layers']} layers x {spec['num_kv_heads']} kv heads x {spec['head_dim']}  "
          f"dtype {spec['kv_dtype']}  quant {spec['quant']}  codec {spec['codec']}  shard {spec['shard']}  "
          f"hidden {'yes' if spec['store_hidden'] else 'no'}")
    print(f"splits       {s['splits']}")
    print(f"cameras      {s['camera_configs']}")
    print(f"writers      {s['writers']}")
    print("provenance")
    for k, v in sorted(s["provenance"].items()):
        print(f"  {k:18s} {v}")
    return 0


def cmd_ls(cfg: LsConfig) -> int:
    cfg.validate()
    st = cfg.open()
    t = st.table()
    col = f"curvature_{cfg.curvature_stat}"
    if cfg.min_curvature is not None and col not in t.column_names and len(t):
        stats = [c[len("curvature_"):] for c in t.column_names if c.startswith("curvature_")]
        raise ValueError(f"no curvature statistic {cfg.curvature_stat!r} in this store; it has {stats}")
    rows = t.to_list() if hasattr(t, "to_list") else [t[i] for i in range(len(t))]
    keep = [
        r for r in rows
        if (cfg.split is None or r["split"] == cfg.split)
        and (cfg.camera_config is None or r["camera_config"] == cfg.camera_config)
        and (cfg.min_curvature is None or (r.get(col) is not None and r[col] >= cfg.min_curvature))
    ]
    if cfg.limit:
        keep = keep[: cfg.limit]
    print(f"{'idx':>5}  {'key':32s} {'split':6s} {'cameras':12s} {'L':>5}  {cfg.curvature_stat:>9s}  reasoning")
    for r in keep:
        c = r.get(col)
        cs = "-" if c is None or (isinstance(c, float) and math.isnan(c)) else f"{c:.4f}"
        text = (r["reasoning"] or "").replace("\n", " ")
        print(f"{r['index']:>5}  {r['key']:32s} {r['split']:6s} {r['camera_config']:12s} {r['prefix_len']:>5}  "
              f"{cs:>9s}  {text[:60]}")
    print(f"{len(keep)} of {len(rows)} samples")
    return 0


def cmd_verify(cfg: VerifyConfig) -> int:
    st = cfg.open(skip_damaged=True)  # damaged manifests are reported, not fatal
    rep = st.verify(data=not cfg.quick)
    print(rep)
    if cfg.drop_bad and rep.damaged:
        dropped = drop_samples(st.url, sorted(rep.damaged), storage_options=st._loc.storage_options or None)
        print(f"dropped {len(dropped)} damaged samples: rebuild them with `cache-build ... --out {st.url} --resume`")
    return 0 if rep.ok else 1


def _sample_ref(s: str) -> int | str:
    return int(s) if s.lstrip("-").isdigit() else s


def cmd_show(cfg: ShowConfig) -> int:
    st = cfg.open()
    ref = _sample_ref(cfg.sample)
    m = st.manifest(ref)
    small = st.read_small(ref)
    print(f"key          {m['key']}  (index {st.keys().index(m['key'])})")
    print(f"split        {m['split']}   cameras {m['camera_config']} {m['camera_names']}")
    print(f"prefix       L={m['prefix_len']}  rope_delta={m['rope_delta']}  v0={m['v0']}")
    print(f"curvature    {m['curvature']}")
    print(f"bytes        logical {_mb(m['bytes_logical'])}  stored {_mb(m['bytes_stored'])}")
    print(f"reasoning    {m['reasoning'] or '(none)'}")
    print(f"yaw change   {_yaw_change(small['ego_future_rot']):+.3f} rad over 6.4 s")
    if cfg.out:
        _plot(m, small, cfg.out)
        print(f"wrote {cfg.out}")
    return 0


def _plot(m: dict, small: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thumbs = small["thumbs"]  # (n_cam, h, w, 3)
    n = len(thumbs)
    fig = plt.figure(figsize=(4 + 3 * max(1, (n + 1) // 2), 5))
    gs = fig.add_gridspec(2, 1 + max(1, (n + 1) // 2), width_ratios=[2] + [1.5] * max(1, (n + 1) // 2))
    ax = fig.add_subplot(gs[:, 0])
    h, f = small["ego_history_xyz"], small["ego_future_xyz"]
    ax.plot(-h[:, 1], h[:, 0], "o-", ms=2, color="gray", label="history")
    ax.plot(-f[:, 1], f[:, 0], "o-", ms=2, color="tab:blue", label="GT future")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("-y (m)   <- left | right ->   (ego frame: x forward, y left)")
    ax.set_ylabel("x (m, forward)")
    ax.legend(loc="best")
    ax.set_title(m["key"], fontsize=8)
    for i in range(n):
        a = fig.add_subplot(gs[i % 2, 1 + i // 2])
        a.imshow(thumbs[i])
        a.set_title(m["camera_names"][i], fontsize=7)
        a.axis("off")
    text = m["reasoning"] or "(no reasoning text)"
    fig.suptitle(text[:120], fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- probe
def _yaw_change(rot: np.ndarray) -> float:
    """Signed heading change over the future (rad): yaw of the last future pose (t0 frame)."""
    yaw = np.unwrap(np.arctan2(rot[:, 1, 0], rot[:, 0, 0]))
    return float(yaw[-1])


def _target(small: dict, kind: str) -> float:
    dyaw = _yaw_change(small["ego_future_rot"])
    if kind == "yaw-change":
        return dyaw
    xyz = np.concatenate([np.zeros((1, 3)), small["ego_future_xyz"]])
    length = float(np.linalg.norm(np.diff(xyz[:, :2], axis=0), axis=1).sum())
    return dyaw / length if length > 1.0 else 0.0  # near-standstill: no meaningful curvature


def _feature(st: Store, key: str, kind: str) -> np.ndarray:
    if kind.startswith("hidden"):
        if not st.spec.store_hidden:
            raise ValueError("this store has no hidden states (built with store_hidden=False): use --feature v-last-mean")
        h = st.read_hidden(key).float()  # (L, hidden)
        return (h.mean(0) if kind == "hidden-mean" else h[-8:].mean(0)).numpy()
    s = st.read(key, layers=[st.spec.num_layers - 1], with_hidden=False)
    return s.v.float().mean(dim=2).reshape(-1).numpy()  # (kv_heads * head_dim,)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Ridge on standardised x (n, d): returns (w, b, mean, std). Dual form when d > n."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    b = float(y.mean())
    yc = y - b
    n, d = z.shape
    if d > n:
        w = z.T @ np.linalg.solve(z @ z.T + alpha * np.eye(n), yc)
    else:
        w = np.linalg.solve(z.T @ z + alpha * np.eye(d), z.T @ yc)
    return w, b, mu, sd


def probe(st: Store, cfg: ProbeConfig) -> dict:
    """Fit ridge(feature -> target) on the train split, score on the eval split, per camera config."""
    t = st.table()
    rows = [t[i] for i in range(len(t))]
    out: dict = {"feature": cfg.feature, "target": cfg.target, "alpha": cfg.alpha, "groups": {}}
    configs = sorted({r["camera_config"] for r in rows})
    for group in [*configs, "all"] if len(configs) > 1 else configs:
        sel = [r for r in rows if group == "all" or r["camera_config"] == group]
        tr = [r["key"] for r in sel if r["split"] == cfg.train_split]
        ev = [r["key"] for r in sel if r["split"] == cfg.eval_split]
        if cfg.max_samples:
            tr, ev = tr[: cfg.max_samples], ev[: cfg.max_samples]
        if len(tr) < 3 or len(ev) < 2:
            out["groups"][group] = {"error": f"need >= 3 {cfg.train_split} and >= 2 {cfg.eval_split} samples, "
                                             f"have {len(tr)} / {len(ev)}"}
            continue
        xs = {k: _feature(st, k, cfg.feature) for k in tr + ev}
        ys = {k: _target(st.read_small(k), cfg.target) for k in tr + ev}
        w, b, mu, sd = ridge_fit(np.stack([xs[k] for k in tr]), np.array([ys[k] for k in tr]), cfg.alpha)
        xe = (np.stack([xs[k] for k in ev]) - mu) / sd
        ye = np.array([ys[k] for k in ev])
        pred = xe @ w + b
        ss_res = float(((ye - pred) ** 2).sum())
        ss_tot = float(((ye - ye.mean()) ** 2).sum())
        r2 = 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")
        r = float(np.corrcoef(pred, ye)[0, 1]) if pred.std() > 0 and ye.std() > 0 else float("nan")
        out["groups"][group] = {"n_train": len(tr), "n_eval": len(ev), "r2": r2, "pearson_r": r,
                                "target_std": float(ye.std())}
    return out


def cmd_probe(cfg: ProbeConfig) -> int:
    cfg.validate()
    st = cfg.open()
    res = probe(st, cfg)
    print(f"probe: ridge({cfg.feature}) -> {cfg.target}, alpha={cfg.alpha}, fit on '{cfg.train_split}', "
          f"scored on '{cfg.eval_split}'")
    print(f"{'camera config':16s} {'n_train':>7} {'n_eval':>6} {'R^2':>7} {'r':>7}")
    for g, r in res["groups"].items():
        if "error" in r:
            print(f"{g:16s} {r['error']}")
        else:
            print(f"{g:16s} {r['n_train']:>7} {r['n_eval']:>6} {r['r2']:>7.3f} {r['pearson_r']:>7.3f}")
    print("R^2 near 0 (or below) means this prefix does not linearly carry the curve for that camera set.")
    return 0


# ============================================================================ CLI
def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cache-inspect", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)

    def store_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("store", help="cache name (cache/<name>) or path / fsspec URL of the store")
        sp.add_argument("--storage-options", default="", help="JSON dict of fsspec options, e.g. an S3 endpoint_url")

    sp = sub.add_parser("summary", help="samples, tokens, bytes, codecs, provenance, splits, camera configs")
    store_args(sp)
    sp.add_argument("--json", dest="as_json", action="store_true", help="print the summary as JSON")

    sp = sub.add_parser("ls", help="list samples, with filters")
    store_args(sp)
    sp.add_argument("--split", default=None, help="keep only this split (train / val / ...)")
    sp.add_argument("--camera-config", default=None, help="keep only this camera configuration")
    sp.add_argument("--min-curvature", type=float, default=None, help="keep samples with curvature stat >= this")
    sp.add_argument("--curvature-stat", default="max_abs", help="curvature statistic that --min-curvature uses")
    sp.add_argument("--limit", type=int, default=0, help="print at most this many rows (0 = all)")

    sp = sub.add_parser("verify", help="checksums, NaN/Inf, schema, provenance; exit 1 on failure")
    store_args(sp)
    sp.add_argument("--quick", action="store_true",
                    help="manifests, files and their sizes only; does not read contents (checksums, NaN/Inf)")
    sp.add_argument("--drop-bad", action="store_true",
                    help="un-commit the damaged samples found, so that cache-build --resume rebuilds them")

    sp = sub.add_parser("show", help="one sample: reasoning, trajectories, t0 thumbnails")
    store_args(sp)
    sp.add_argument("sample", help="sample key clip_id@t0_us:camera_config (as `ls` prints it, e.g. "
                    "clip-00003@5400000:front-only) or integer index")
    sp.add_argument("--out", default=None, help="write a PNG of trajectories + thumbnails to this path")

    sp = sub.add_parser("probe", help="ridge probe: cached prefix features -> GT future curvature")
    store_args(sp)
    sp.add_argument("--feature", default="hidden-mean",
                    help="hidden-mean (mean-pooled last-layer hidden) | hidden-last8 | v-last-mean (last-layer V)")
    sp.add_argument("--target", default="yaw-change", help="yaw-change (rad over 6.4 s) | mean-curvature (1/m)")
    sp.add_argument("--alpha", type=float, default=10.0, help="ridge strength on standardised features")
    sp.add_argument("--train-split", default="train", help="split to fit on")
    sp.add_argument("--eval-split", default="val", help="split to score on")
    sp.add_argument("--max-samples", type=int, default=0, help="cap samples per split (0 = all)")
    return p


_COMMANDS = {
    "summary": (SummaryConfig, cmd_summary), "ls": (LsConfig, cmd_ls), "verify": (VerifyConfig, cmd_verify),
    "show": (ShowConfig, cmd_show), "probe": (ProbeConfig, cmd_probe),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    cls, fn = _COMMANDS[args.pop("cmd")]
    try:
        rc = fn(cls(**args))
        sys.stdout.flush()  # here, not at exit: a closed pipe is caught below
        return rc
    except BrokenPipeError:  # `cache-inspect ls ... | head`: the reader left; not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: let that go nowhere
        return 0
    except (*user_errors(), KeyError, IndexError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cache-inspect: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
