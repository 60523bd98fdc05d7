"""head-compare: several head-eval results -> one table (console + markdown) and PNGs.

    head-compare --results runs/a.json runs/b.json --out runs/compare --runs ft=runs/front
    # the seed's camera ablation for a checkpoint: its head on each cache, plus a fine-tuned head
    head-compare --out runs/ablation --cache full=cache/full --cache front-masked=cache/masked \
                 --cache front-only=cache/front --cache front+tele=cache/front_tele \
                 --head fine-tuned=runs/front/head.safetensors@front-only

`--cache NAME=STORE` evaluates the checkpoint's own head (baseline) on that store;
`--head LABEL=FILE@NAME` evaluates a fine-tuned head file on the store called NAME (repeatable). Each
evaluation goes through head-eval into OUT/eval_<label>.json (skipped when it is up to date). Writes OUT/compare.md, OUT/samples.png
(bird's-eye per sample beside the front frame), OUT/bins.png (metrics per GT curvature bin) and,
with --runs, OUT/loss.png (training curves from each run's metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared.cli import user_errors
from shared.store import Store, StoreError

from .head_eval import EvalConfig, evaluate
from .metrics import BINS

OVERALL = (("n", "n", "{:.0f}"), ("min_ade", "minADE", "{:.2f}"), ("ade", "ADE", "{:.2f}"),
           ("min_ade/by_t=3.0", "minADE@3s", "{:.2f}"), ("min_fde", "minFDE", "{:.2f}"),
           ("corner_distance", "corner", "{:.2f}"), ("max_lat_dev", "max lat dev", "{:.2f}"),
           ("gt_max_lat_dev", "GT max lat dev", "{:.2f}"), ("lat_err@6.4", "lat err 6.4s", "{:+.2f}"),
           ("abs_heading_err", "|heading err|", "{:.2f}"))
GROUP_ORDER = ("sharp", "gentle", "curved", *BINS)


def _fmt(v, f: str) -> str:
    return "-" if v is None else f.format(v)


def tables(results: list[dict], labels: list[str]) -> str:
    """Markdown: overall metrics and straight-bias per run, then minADE / max lateral deviation /
    straight-bias score per GT curvature bin."""
    head = ["run", "cameras", *[h for _, h, _ in OVERALL], "bias sharp", "bias curved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r, lab in zip(results, labels):
        a, bb = r["by_bin"]["all"], r["by_bin"]
        cams = sorted({row["camera_config"] for row in r["per_sample"]})
        cells = [lab, ",".join(cams), *[_fmt(a.get(k), f) for k, _, f in OVERALL],
                 _fmt(bb.get("sharp", {}).get("straight_bias"), "{:.2f}"),
                 _fmt(bb.get("curved", {}).get("straight_bias"), "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    groups = [g for g in GROUP_ORDER if any(g in r["by_bin"] for r in results)]
    lines += ["", "minADE (m) / max lateral deviation (m, GT in brackets) / straight-bias score, per GT bin:", "",
              "| bin | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for g in groups:
        ref = next(r["by_bin"][g] for r in results if g in r["by_bin"])
        cells = []
        for r in results:
            b = r["by_bin"].get(g)
            cells.append("-" if b is None else
                         f"{_fmt(b.get('min_ade'), '{:.2f}')} / {_fmt(b.get('max_lat_dev'), '{:.1f}')} "
                         f"({_fmt(b.get('gt_max_lat_dev'), '{:.1f}')}) / {_fmt(b.get('straight_bias'), '{:.2f}')}")
        lines.append(f"| {g} | {ref['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for it in items:
        name, sep, value = it.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} {it!r}: expected NAME=PATH")
        if name in out:
            raise ValueError(f"{flag}: name {name!r} given twice")
        out[name] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="head-compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (compare.md, PNGs, evaluation JSONs)")
    p.add_argument("--results", nargs="*", default=[], help="existing head-eval result JSONs")
    p.add_argument("--labels", default=None, help="comma list of labels for --results (default: their own)")
    p.add_argument("--cache", action="append", default=[], help="NAME=STORE: evaluate the baseline head on it")
    p.add_argument("--checkpoint", default=None, help="checkpoint whose head is the baseline (default: each store's)")
    p.add_argument("--head", action="append", default=[],
                   help="LABEL=HEAD_FILE@NAME: evaluate a fine-tuned head on the --cache store NAME")
    p.add_argument("--runs", action="append", default=[], help="LABEL=RUN_DIR: plot its metrics.jsonl loss curves")
    p.add_argument("--split", default="val", help="store split to evaluate")
    p.add_argument("--num-samples", type=int, default=6, help="trajectories per prefix")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-rows", type=int, default=6, help="samples drawn in samples.png")
    p.add_argument("--force", action="store_true", help="re-run evaluations even when up to date")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> tuple[str, Path]:
    out = Path(a.out)
    caches, runs = _pairs(a.cache, "--cache"), _pairs(a.runs, "--runs")
    heads = []
    for label, spec in _pairs(a.head, "--head").items():
        path, sep, name = spec.rpartition("@")
        if not sep or name not in caches:
            raise ValueError(f"--head {label}={spec}: expected LABEL=HEAD_FILE@NAME with NAME one of the --cache "
                             f"names {sorted(caches)}")
        if not Path(path).is_file():
            raise ValueError(f"--head {label}: {path}: no such head file (train one with head-train)")
        heads.append((label, caches[name], path))
    for path in a.results:
        if not Path(path).is_file():
            raise ValueError(f"--results {path}: no such file")
    results = [json.loads(Path(p).read_text()) for p in a.results]
    labels = a.labels.split(",") if a.labels else [r.get("label", Path(p).stem) for r, p in zip(results, a.results)]
    if len(labels) != len(results):
        raise ValueError(f"--labels has {len(labels)} names for {len(results)} results")
    jobs = [(f"baseline {n}", s, None) for n, s in caches.items()] + heads
    for label, store, head in jobs:
        cfg = EvalConfig(cache=store, out=str(out / f"eval_{label.replace(' ', '_')}.json"), head=head, label=label,
                         checkpoint=a.checkpoint, split=a.split, num_samples=a.num_samples, seed=a.seed, force=a.force)
        results.append(evaluate(cfg))
        labels.append(label)
    if not results:
        raise ValueError("nothing to compare: give --results and/or --cache")
    md = tables(results, labels)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text("# head-compare\n\n" + md)
    from .plots import plot_bins, plot_comparison, plot_losses

    # the front frame comes from the first front-only store, else the first result's store
    urls = [r["metadata"]["cache"]["url"] for r in results]
    cams = [{row["camera_config"] for row in r["per_sample"]} for r in results]
    store = next((u for u, c in zip(urls, cams) if c == {"front-only"}), urls[0])
    try:
        Store.open(store)
    except (StoreError, OSError):
        print(f"head-compare: {store} cannot be opened: samples.png without the front frames", file=sys.stderr)
        store = None
    plot_comparison(results, out / "samples.png", store_url=store, max_rows=a.max_rows, labels=labels)
    plot_bins(results, out / "bins.png", labels=labels)
    if runs:
        plot_losses(runs, out / "loss.png")
    return md, out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        md, out = run(a)
    except user_errors() as exc:
        print(f"head-compare: error: {exc}", file=sys.stderr)
        return 2
    print(md)
    print(f"head-compare: {out}/compare.md, samples.png, bins.png" + (", loss.png" if a.runs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
