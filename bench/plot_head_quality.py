"""Loss curves of the update-quality bench (docs/bench_head_train_quality_<gpu>.json) -> a PNG for the docs.

    python bench/plot_head_quality.py            # writes docs/head_train_quality_h200.png
    python bench/plot_head_quality.py --gpu h100 # writes docs/head_train_quality_h100.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="h200", choices=["h200", "h100"], help="whose bench file")
    ap.add_argument("out", nargs="?", help="PNG path (default docs/head_train_quality_<gpu>.png)")
    args = ap.parse_args(argv)
    src = DOCS / f"bench_head_train_quality_{args.gpu}.json"
    out = Path(args.out) if args.out else DOCS / f"head_train_quality_{args.gpu}.png"
    doc = json.loads(src.read_text())
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for r in rows:
        loss = np.asarray(r["loss"])
        smooth = np.convolve(loss, np.ones(8) / 8, mode="valid")  # 8-step moving mean: 4 prefixes x 4 batches
        style = dict(color="black", lw=2.2) if r["dtype"] == "float32" else dict(lw=1.2)
        if r["dtype"] == "float32" and r.get("run", 1) > 1:
            style = dict(color="gray", lw=1.6, ls="--")
        runs = f", run {r['run']}" if len({x.get("run", 1) for x in rows}) > 1 else ""
        what = r["optimizer"] + (" fast math" if r.get("adam8_fast") else "") + \
            (f", {r['attention']} attention" if r.get("attention") else "")
        ax.plot(np.arange(len(smooth)) + 8, smooth, label=f"{r['dtype']} + {what} ({r['engine']}{runs})", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss (8-step mean)")
    ax.set_title(f"release-shape head, fixed synthetic target, {args.gpu.upper()} (random weights), "
                 f"{len(rows[0]['loss'])} steps", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
