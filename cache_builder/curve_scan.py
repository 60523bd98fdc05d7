"""curve-scan: per-clip curvature statistics over the valid t0 window, threshold / top-k selection.

    curve-scan /data/pai --threshold 0.05 --max-clips 500 --output runs/curve_scan.json

Successor of the seed's `scan_all_curves.py --threshold 0.05`. Bad clips are skipped and reported
(counts by reason) instead of stopping the scan; every row carries the clip's split.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from shared.data import ClipDataError, LocalDataset, SkipReport, open_dataset
from shared.data.errors import UNEXPECTED


@dataclass
class CurveScanConfig:
    root: Path  # local download of PhysicalAI-AV (plain tree, hub cache or a synthetic world)
    threshold: float = 0.05  # select clips whose max |kappa| in the valid window >= this [1/m]
    top_k: int | None = None  # keep only the k most curved selected clips (None: all above threshold)
    max_clips: int | None = None  # scan only the first N available clips in index order (None: all)
    output: Path | None = None  # report file, .json or .parquet (None: print the summary only)
    source: str = "path"  # curvature from the path ('path', yaw change per metre) or the 'column'
    overwrite: bool = False  # replace an existing output file
    progress: bool = True  # tqdm progress bar

    def validate(self) -> None:
        if not Path(self.root).is_dir():
            raise ValueError(
                f"dataset root {self.root} is not a directory (write one with `synth-world OUT`)"
            )
        if not self.threshold > 0:
            raise ValueError(f"--threshold must be > 0 [1/m], got {self.threshold}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.max_clips is not None and self.max_clips < 1:
            raise ValueError(f"--max-clips must be >= 1, got {self.max_clips}")
        if self.source not in ("path", "column"):
            raise ValueError(f"--source must be 'path' or 'column', got {self.source!r}")
        if self.output is not None:
            if Path(self.output).suffix not in (".json", ".parquet"):
                raise ValueError(f"--output must end in .json or .parquet, got {self.output}")
            if Path(self.output).exists() and not self.overwrite:
                raise ValueError(f"{self.output} exists; pass --overwrite to replace it")


def scan(ds: LocalDataset, clip_ids: list[str], source: str = "path", progress: bool = False):
    """Curvature stats per clip -> (rows: list[dict], SkipReport). Never raises on a bad clip."""
    rows, report = [], SkipReport()
    for clip_id in tqdm(clip_ids, desc="curve-scan", unit="clip", disable=not progress):
        try:
            with ds.open_clip(clip_id) as clip:
                stats = clip.curvature_stats(source)
            rows.append(
                {"clip_id": clip_id, "chunk": clip.chunk, "split": ds.split_of(clip_id), **stats.to_dict()}
            )
        except ClipDataError as err:
            report.add(err)
        except Exception as exc:  # noqa: BLE001 - one odd clip must not stop a 300k-clip scan
            report.add(ClipDataError(clip_id, ds.root, UNEXPECTED, f"{type(exc).__name__}: {exc}"))
    return rows, report


def select(rows: list[dict], threshold: float, top_k: int | None) -> list[dict]:
    """Rows with max |kappa| >= threshold, most curved first, truncated to top_k; marks `selected`/`rank`."""
    chosen = sorted((r for r in rows if r["max_abs_kappa"] >= threshold), key=lambda r: -r["max_abs_kappa"])
    chosen = chosen[:top_k] if top_k else chosen
    ranks = {r["clip_id"]: i for i, r in enumerate(chosen)}
    for r in rows:
        r["selected"] = r["clip_id"] in ranks
        r["rank"] = ranks.get(r["clip_id"], -1)
    return chosen


def write_report(path: Path, header: dict, rows: list[dict], report: SkipReport) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".json":
        tmp.write_text(json.dumps({**header, "clips": rows, "skipped": report.to_dict()}, indent=1))
    else:
        skipped = [
            {
                "clip_id": i.clip_id,
                "status": "skipped",
                "skip_reason": i.reason,
                "skip_file": i.file,
                "skip_detail": i.detail,
            }
            for i in report.items
        ]
        df = pd.DataFrame([{**r, "status": "scanned"} for r in rows] + skipped)
        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = {b"curve_scan": json.dumps({**header, "skip_counts": report.counts}).encode()}
        pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), tmp)
    tmp.replace(path)


def run(cfg: CurveScanConfig) -> dict:
    cfg.validate()
    ds = open_dataset(cfg.root)
    clip_ids = ds.clip_ids()
    if cfg.max_clips is not None:
        clip_ids = clip_ids[: cfg.max_clips]
    rows, report = scan(ds, clip_ids, cfg.source, cfg.progress)
    chosen = select(rows, cfg.threshold, cfg.top_k)
    header = {
        "tool": "curve-scan",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "dataset_root": str(ds.root),
        "dataset_revision": ds.revision,
        "n_scanned": len(clip_ids),
        "n_ok": len(rows),
        "n_selected": len(chosen),
        "selected": [r["clip_id"] for r in chosen],
    }
    if cfg.output is not None:
        write_report(Path(cfg.output), header, rows, report)
    print(
        f"curve-scan: {len(clip_ids)} clips, {len(chosen)} selected (|kappa| >= {cfg.threshold}), {report.summary()}"
    )
    for r in chosen[:20]:
        print(
            f"  {r['clip_id']}  {r['direction']:>8}  kappa={r['signed_peak_kappa']:+.4f} at {r['t_peak_us'] / 1e6:.1f}s  {r['split']}"
        )
    return {**header, "clips": rows, "skipped": report.to_dict()}


def parse_args(argv: list[str] | None = None) -> CurveScanConfig:
    p = argparse.ArgumentParser(prog="curve-scan", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="local PhysicalAI-AV download (or synthetic world) to scan")
    p.add_argument(
        "--threshold", type=float, default=0.05, help="select clips with max |kappa| >= this [1/m]"
    )
    p.add_argument("--top-k", type=int, default=None, help="keep only the K most curved selected clips")
    p.add_argument("--max-clips", type=int, default=None, help="scan only the first N available clips")
    p.add_argument(
        "--output", type=Path, default=None, help="write the report to this .json or .parquet file"
    )
    p.add_argument(
        "--source",
        choices=("path", "column"),
        default="path",
        help="curvature from the path (yaw change per metre) or the egomotion 'curvature' column",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    a = p.parse_args(argv)
    return CurveScanConfig(**vars(a))  # flags mirror the config fields one to one


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"curve-scan: error: {exc}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
