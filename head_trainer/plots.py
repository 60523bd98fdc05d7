"""PNG comparison of evaluation results: per sample, the t0 front thumbnail and a bird's-eye view
of the ground truth against each model's first sampled trajectory (y left is drawn to the left)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")


def _front_thumb(store, key: str) -> np.ndarray | None:
    if store is None or key not in store:
        return None
    small = store.read_small(key)
    names = store.manifest(key)["camera_names"]
    idx = next((i for i, n in enumerate(names) if "front_wide" in n), 0)
    return small["thumbs"][idx]


def plot_comparison(results: list[dict], out_png: str | Path, store_url: str | None = None,
                    max_rows: int = 6, labels: list[str] | None = None) -> Path:
    """results: head-eval JSON dicts over the same samples; rows = the most curved samples first."""
    from shared.store import Store

    store = Store.open(store_url) if store_url else None
    labels = labels or [r.get("label", f"run {i}") for i, r in enumerate(results)]
    by_key = [{row["key"]: row for row in r["per_sample"]} for r in results]
    keys = [k for k in by_key[0] if all(k in b for b in by_key)]
    keys.sort(key=lambda k: -abs(by_key[0][k]["curvature"].get("future_max_abs_kappa", 0.0)))
    keys = keys[:max_rows]
    fig, axes = plt.subplots(len(keys), 2, figsize=(9, 3.2 * len(keys)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    for r, key in enumerate(keys):
        ax_img, ax = axes[r]
        thumb = _front_thumb(store, key)
        if thumb is not None:
            ax_img.imshow(thumb)
        ax_img.set_axis_off()
        ax_img.set_title(key[:40], fontsize=8)
        gt = np.asarray(by_key[0][key]["gt_xy"])
        ax.plot(-gt[:, 1], gt[:, 0], "k-", lw=2.5, label="ground truth")
        for i, (b, lab) in enumerate(zip(by_key, labels)):
            pred = np.asarray(b[key]["pred_xy"])  # (K, 64, 2)
            for k in range(1, pred.shape[0]):
                ax.plot(-pred[k, :, 1], pred[k, :, 0], color=COLORS[i % len(COLORS)], lw=0.6, alpha=0.3)
            m = b[key]["metrics"]
            ax.plot(-pred[0, :, 1], pred[0, :, 0], color=COLORS[i % len(COLORS)], lw=1.8,
                    label=f"{lab}: ADE {m['ade']:.2f} FDE {m['fde']:.2f}")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("lateral (m, left <-)", fontsize=8)
        ax.set_ylabel("forward (m)", fontsize=8)
        ax.legend(fontsize=6, loc="best")
        ax.grid(alpha=0.3)
    summary = "   ".join(f"{lab}: minADE {r['summary']['min_ade']:.2f} ADE {r['summary']['ade']:.2f} "
                         f"FDE {r['summary']['fde']:.2f}" for lab, r in zip(labels, results))
    fig.suptitle(summary, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
