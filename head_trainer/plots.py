"""PNGs of evaluation results (head-eval --plot, head-compare).

One axis convention everywhere: the ego frame at t0, x forward, y LEFT (metrics.py). Bird's-eye plots
draw x upwards and -y to the right, so the ego's left is on the left of the picture, as in the front
camera image beside it and in `cache-inspect show`.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import BINS  # noqa: E402

COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:cyan")
LATERAL_LABEL = "-y (m)   <- left | right ->   (ego frame: x forward, y left)"
FORWARD_LABEL = "x (m, forward)"


def _save(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _front_thumb(store, key: str) -> np.ndarray | None:
    if store is None or key not in store:
        return None
    small = store.read_small(key)
    names = store.manifest(key)["camera_names"]
    idx = next((i for i, n in enumerate(names) if "front_wide" in n), 0)
    return small["thumbs"][idx]


def moment(row: dict) -> str:
    """A sample's clip and keyframe: the same moment in stores of different camera configs."""
    return f"{row['clip_id']}@{row['t0_us']}"


def by_moment(results: list[dict]) -> list[dict[str, dict]]:
    return [{moment(row): row for row in r["per_sample"]} for r in results]


def pick_keys(results: list[dict], max_rows: int) -> list[str]:
    """Moments common to all results: the sharpest curves of each side first, then one straight."""
    by_key = by_moment(results)
    rows = [by_key[0][k] for k in by_key[0] if all(k in b for b in by_key)]
    kappa = {moment(r): r["curvature"].get("future_signed_peak_kappa", 0.0) for r in rows}
    left = sorted((k for k in kappa if kappa[k] > 0), key=lambda k: -kappa[k])
    right = sorted((k for k in kappa if kappa[k] < 0), key=lambda k: kappa[k])
    straight = sorted(kappa, key=lambda k: abs(kappa[k]))[:1]
    out: list[str] = []
    for pair in zip(left + [None] * len(right), right + [None] * len(left)):
        out += [k for k in pair if k is not None and k not in out]
    out = out[: max(1, max_rows - 1)] + [k for k in straight if k not in out]
    return out[:max_rows]


def plot_comparison(results: list[dict], out_png: str | Path, store_url: str | None = None,
                    max_rows: int = 6, labels: list[str] | None = None) -> Path:
    """Per sample: the t0 front frame and a bird's-eye view of the GT and each result's K samples
    (sample 0 bold). `results`: head-eval JSON dicts; rows: the sharpest curves first."""
    from shared.store import Store

    store = Store.open(store_url) if store_url else None
    labels = labels or [r.get("label", f"run {i}") for i, r in enumerate(results)]
    by_key = by_moment(results)
    keys = pick_keys(results, max_rows)
    if not keys:
        raise ValueError("the results share no sample (clip and keyframe): nothing to draw")
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.3 * len(keys)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.5, 1]})
    for r, key in enumerate(keys):
        ax_img, ax = axes[r]
        row0 = by_key[0][key]
        thumb = next((t for t in (_front_thumb(store, b[key]["key"]) for b in by_key) if t is not None), None)
        if thumb is not None:
            ax_img.imshow(thumb)
        ax_img.set_axis_off()
        kappa = row0["curvature"].get("future_signed_peak_kappa", 0.0)
        ax_img.set_title(f"{key[:18]}...  {row0.get('bin', '')}  peak kappa {kappa:+.3f} 1/m  (front, t0)",
                         fontsize=8)
        gt = np.asarray(row0["gt_xy"])
        ax.plot(-gt[:, 1], gt[:, 0], "k-", lw=3, label="ground truth")
        for i, (b, lab) in enumerate(zip(by_key, labels)):
            pred = np.asarray(b[key]["pred_xy"])  # (K, 64, 2)
            c = COLORS[i % len(COLORS)]
            for k in range(1, pred.shape[0]):
                ax.plot(-pred[k, :, 1], pred[k, :, 0], color=c, lw=0.6, alpha=0.35)
            m = b[key]["metrics"]
            ax.plot(-pred[0, :, 1], pred[0, :, 0], color=c, lw=1.8,
                    label=f"{lab}: minADE {m['min_ade']:.2f}  max|y| {m['max_lat_dev']:.1f} m")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel(LATERAL_LABEL, fontsize=7)
        ax.set_ylabel(FORWARD_LABEL, fontsize=8)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    parts = [f"{lab}: minADE {r['summary']['min_ade']:.2f} m" for lab, r in zip(labels, results)]
    lines = ["   ".join(parts[i:i + 3]) for i in range(0, len(parts), 3)]  # 3 runs a line: never cut at the edges
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.012 * (len(lines) + 1)))
    return _save(fig, out_png)


BAR_METRICS = (("min_ade", "minADE (m)"), ("max_lat_dev", "max lateral deviation (m)"),
               ("straight_bias", "straight-bias score (1 = follows the curve)"), ("abs_heading_err", "|heading error| (rad)"))


def plot_bins(results: list[dict], out_png: str | Path, labels: list[str] | None = None) -> Path:
    """Bars per GT curvature bin for each result; GT max lateral deviation as black ticks."""
    labels = labels or [r.get("label", f"run {i}") for i, r in enumerate(results)]
    bins = [b for b in BINS if any(b in r.get("by_bin", {}) for r in results)]
    fig, axes = plt.subplots(1, len(BAR_METRICS), figsize=(4.2 * len(BAR_METRICS), 3.8), squeeze=False)
    width = 0.8 / max(1, len(results))
    x = np.arange(len(bins))
    for ax, (metric, title) in zip(axes[0], BAR_METRICS):
        for i, (r, lab) in enumerate(zip(results, labels)):
            vals = [(r.get("by_bin", {}).get(b, {}).get(metric)) for b in bins]
            ax.bar(x + (i - (len(results) - 1) / 2) * width, [np.nan if v is None else v for v in vals], width,
                   color=COLORS[i % len(COLORS)], label=lab)
        if metric == "max_lat_dev":
            gt = [results[0].get("by_bin", {}).get(b, {}).get("gt_max_lat_dev", np.nan) for b in bins]
            ax.scatter(x, gt, marker="_", s=400, color="k", zorder=3, label="ground truth")
        if metric == "straight_bias":
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(x, bins, rotation=30, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    n = {b: results[0].get("by_bin", {}).get(b, {}).get("n", 0) for b in bins}
    axes[0][0].set_xlabel("GT bin (samples: " + ", ".join(f"{b} {n[b]}" for b in bins) + ")", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_losses(runs: dict[str, str | Path], out_png: str | Path) -> Path:
    """Train (and validation, when logged) loss against step from each run dir's metrics.jsonl."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (lab, run) in enumerate(runs.items()):
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no training log (is {run} a head-train run directory?)")
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        c = COLORS[i % len(COLORS)]
        for key, style in (("loss", "-"), ("train_loss", "-"), ("val_loss", "--")):
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, color=c, label=f"{lab} {key}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)
