"""Render the tables of docs/PERFORMANCE.md from the bench files in docs/, so no figure drifts from its run.

    python bench/perf_tables.py           # rewrite the generated regions of docs/PERFORMANCE.md in place
    python bench/perf_tables.py --check   # exit 1 and print a diff when the doc differs from the JSON

A generated region is the text between `<!-- table: NAME -->` and `<!-- /table -->`; NAME is a key of
RENDERERS and its function returns the region's markdown. Every number printed comes from a field of a
bench file (or arithmetic on fields, said in the table's caption); a figure with no file behind it does
not belong in a region: write it in the prose as "(no JSON: <reason>)".

Rounding: one rule everywhere, `fmt`: half away from zero at the shown precision, in decimal, on the
digits the file holds (JSON is parsed with parse_float=Decimal), so 0.2445 -> "0.245" although the binary
float 0.2445 is a little below it.

To add a table (e.g. head-train): put the bench JSON in docs/, write `def my_table() -> str` that reads it
with `load("bench_head_train_h200.json")` and returns `table(header, rows)` (or any markdown), decorate it
with `@renderer("head_train_step")`, and put `<!-- table: head_train_step -->` / `<!-- /table -->` in the
doc; run without --check. A region without a renderer, or a renderer without a region, is an error.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_tables_head  # noqa: E402,F401  (registers the head-train tables)
from perf_format import DOC, DOCS, REGION, RENDERERS, fmt, load, prose, renderer, span, table  # noqa: E402

CAMS = {"4cam": "4 cameras", "front": "front-only"}
STORE = {"none": "bf16", "int8": "int8", "int4": "int4"}


def ms(x) -> str:
    return fmt(Decimal(x) * 1000, 0)


def row(d: dict, cams: str, quant: str, writer: str = "full") -> dict:
    """The build row of one bench run for (cams, quant); runs before the `writer` field wrote 'full'."""
    (r,) = [r for r in d["build_rows"] if r["cams"] == cams and r["quant"] == quant
            and r.get("writer", "full") == writer]
    return r


MAIN = "bench_cache_build_h200.json"
BUILDS = [("4cam", "none"), ("4cam", "int8"), ("4cam", "int4"), ("front", "none"), ("front", "int8"),
          ("front", "int4")]


@renderer("prefill")
def prefill_table() -> str:
    d = load(MAIN)
    rows = [[CAMS[c], fmt(d[f"{c}_prefix_len"], 0, sep=True), f"{ms(d[f'{c}_prefill_B1_s_per_sample'])} ms",
             f"{ms(d[f'{c}_prefill_B4_s_per_sample'])} ms", f"{fmt(d[f'{c}_prefill_B4_peak_GiB'], 1)} GiB",
             f"{ms(d[f'{c}_inputs_cpu_s_per_sample'])} ms"] for c in CAMS]
    return table(["prefix", "L", "prefill B=1", "prefill B=4 (per sample)", "peak GPU (B=4)",
                  "CPU stage per sample (one core)"], rows)


def build_rows() -> list[tuple[str, dict]]:
    """(store label, row) of the main run, with the no-codec run's row after 4-camera bf16."""
    d, nc = load(MAIN), load("bench_cache_build_h200_codec_none.json")
    out = [(f"{STORE[q]} + zstd", row(d, c, q)) for c, q in BUILDS]
    (r,) = nc["build_rows"]
    out.insert(1, (f"bf16, no codec ({r['samples']} samples)", r))
    return out


@renderer("build")
def build_table() -> str:
    rows = [[CAMS[r["cams"]], label, fmt(r["steady_s_per_sample"], 3), f"**{fmt(r['steady_ratio_to_prefill_B4'], 2)}**",
             fmt(r["s_per_sample"], 3), fmt(r["GB_per_s_written"], 2), fmt(r["MB_per_sample_stored"], 1),
             f"{fmt(r['peak_GiB'], 1)} GiB"] for label, r in build_rows()]
    return table(["prefix", "store", "steady s/sample", "**x prefill**", "end to end s/sample", "GB/s written",
                  "MB/sample stored", "peak GPU"], rows)


@renderer("build_notes")
def build_notes() -> str:
    rs = [r for _, r in build_rows()]
    pace = max(abs(r["commit_pace_s_per_sample"] / r["steady_s_per_sample"] - 1) for r in rs) * 100
    fill = [(r["s_per_sample"] - r["steady_s_per_sample"]) * r["samples"] for r in rs]
    zstd, nocodec, *rest = rs
    return prose(f"Commit pace (`commit_pace_s_per_sample`, from the manifests' commit times) and steady differ by "
                 f"at most {fmt(pace, 1)} % in any row. End to end minus steady, times the samples, is "
                 f"{span(fill, 1)} s per run: filling the pipeline and draining the writer, which a long build pays "
                 f"once. The GPU stage waited for a writer slot {fmt(zstd['waited_writer_s'], 2)} s in the whole "
                 f"4-camera bf16 + zstd run, {fmt(nocodec['waited_writer_s'], 2)} s in the no-codec run and "
                 f"{span([r['waited_writer_s'] for r in rest], 2)} s in the others; it waited "
                 f"{span([r['waited_inputs_s'] for r in rs], 1)} s for inputs, almost all at the start.")


HISTORY = [("writer threads, zarr in-process (previous session)", "bench_cache_build_h200_writer_threads.json", "full"),
           ("the same, `sys.setswitchinterval(0.2 ms)`", "bench_cache_build_h200_switchinterval.json", "full"),
           ("writer threads, one trip to zarr's loop per sample, metadata cached",
            "bench_cache_build_h200_writer_threads_onetrip.json", "full"),
           ("**control: staging only** (stack/quantise, NaN count, D2H; nothing written)",
            "bench_cache_build_h200_stage_only.json", "stage-only"),
           ("8 writer processes (above)", MAIN, "full")]


@renderer("writer_history")
def history_table() -> str:
    rows = []
    for label, name, writer in HISTORY:
        cells = [fmt(row(load(name), c, q, writer)["steady_ratio_to_prefill_B4"], 2)
                 for c, q in [("4cam", "none"), ("4cam", "int8"), ("front", "int4")]]
        rows.append([label, *(f"**{v}**" if writer == "stage-only" else v for v in cells)])
    return table(["build, steady x prefill", "4 cam bf16", "4 cam int8", "front int4"], rows)


@renderer("writer_ceiling")
def ceiling_table() -> str:
    """From bench_store_write's printed rows (its GB/s column is already at 2 decimals)."""
    got: dict[str, dict[str, str]] = {}
    for line in (DOCS / "bench_store_write_h200.txt").read_text().splitlines()[1:]:
        *name, n, gbs = line.split()
        got.setdefault(" ".join(name), {})[n] = gbs

    def cell(name, ns, bold=None):
        return " / ".join(f"**{got[name][n]}**" if n == bold else got[name][n] for n in ns)

    runs = [load(p.name) for p in sorted(DOCS.glob("bench_*_h200*.json"))]
    dd = [d["disk_write_GBps_odirect"] for d in runs if "disk_write_GBps_odirect" in d]
    rows = [["zstd-1 alone (numcodecs, 4 / 8 / 12 / 16 threads)", cell("zstd-raw", ["4", "8", "12", "16"])],
            ["StoreWriter, one process, 4 / 8 / 12 / 16 threads", cell("writer-T", ["4", "8", "12", "16"], "8")],
            ["StoreWriter, one process, 16 threads, blosc-lz4 / no compression",
             f"{got['writer-T blosc-lz4']['16']} / {got['writer-T none']['16']}"],
            ["StoreWriter, 4 / 8 / 12 processes (one thread each, one store)", cell("writer-P", ["4", "8", "12"], "12")],
            [f"sequential O_DIRECT disk write (dd), as each of {len(dd)} one-process bench runs measured it", span(dd, 2)]]
    return table(["what (16 cores, one release-size 4-camera bf16 sample written again and again)", "logical GB/s"], rows)


@renderer("two_per_gpu")
def two_per_gpu_table() -> str:
    """Two processes' paces add as rates: pair pace = 1 / sum(1 / pace)."""
    ps = load("bench_cache_build_h200_two_per_gpu.json")["processes"]
    pre = 1 / sum(1 / p["4cam_prefill_B4_s_per_sample"] for p in ps)
    rows = []
    for q in ["none", "int8"]:
        rs = [row(p, "4cam", q) for p in ps]
        pair = 1 / sum(1 / r["steady_s_per_sample"] for r in rs)
        rows.append([f"4 cameras {STORE[q]} + zstd", " / ".join(fmt(r["steady_s_per_sample"], 3) for r in rs),
                     fmt(pair, 3), fmt(pre, 3), f"**{fmt(pair / pre, 2)}**",
                     " / ".join(fmt(r["s_per_sample"], 3) for r in rs), span([r["peak_GiB"] for r in rs], 1) + " GiB"])
    return table(["store", "steady s/sample, each process", "pair's steady s/sample", "pair's prefill B=4 s/sample",
                  "**x prefill**", "end to end s/sample, each", "peak GPU, each"], rows)


ROLLOUTS = [("rollout run", "bench_rollout_h200.json", [1, 8, 16]), ("main run, 48 GiB cap", MAIN, [8])]


@renderer("rollout")
def rollout_table() -> str:
    rows = []
    for run, name, batches in ROLLOUTS:
        d = load(name)
        for b in batches:
            k = f"rollout_60tok_B{b}_"
            eager = d.get(k + "eager_s_per_sample")
            rows.append([str(b), run, fmt(d[k + "generate_s_per_sample"], 2), "" if eager is None else fmt(eager, 2),
                         f"**{fmt(d[k + 'graphs_s_per_sample'], 3)}**", f"{fmt(d[k + 'graphs_capture_s'], 1)} s",
                         f"{fmt(d[k + 'graphs_peak_GiB'], 1)} GiB"])
    return table(["batch", "run", "generate s/sample", "decoder, eager steps", "**decoder, CUDA graphs**", "capture",
                  "peak GPU"], rows)


@renderer("rollout_build")
def rollout_build_table() -> str:
    d = load(MAIN)
    rows = [[str(b), fmt(d[f"rollout_build_60tok_B{b}_handed_over_s_per_sample"], 3),
             fmt(d[f"rollout_build_60tok_B{b}_s_per_sample"], 2)] for b in [8, 16]]
    return table(["batch (one batch per run)", "GPU stage hand-over s/sample", "end to end s/sample"], rows)


@renderer("velocity_error")
def velocity_error() -> str:
    d = load("bench_cache_build_h200_writer_threads.json")

    def pc(c):
        return " / ".join(f"{fmt(d[f'{c}_velocity_rel_err_{q}_vs_bf16'] * 100, 1)} %" for q in ["int8", "int4"])
    return prose(f"Head velocity from quantised prefixes vs the bf16 prefix (release-size head, random weights, one "
                 f"sample, x and t fixed; previous session, `_writer_threads.json`): int8 / int4 {pc('4cam')} "
                 f"(4 cameras), {pc('front')} (front-only).")


def render(text: str) -> str:
    names = [m.group(2) for m in REGION.finditer(text)]
    if unknown := sorted(set(names) - set(RENDERERS)):
        raise SystemExit(f"perf_tables: no renderer for region(s) {unknown}")
    if missing := sorted(set(RENDERERS) - set(names)):
        raise SystemExit(f"perf_tables: renderer(s) {missing} have no region in {DOC.name}")
    return REGION.sub(lambda m: m.group(1) + RENDERERS[m.group(2)]() + m.group(4), text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if the doc is stale")
    ap.add_argument("--doc", type=Path, default=DOC, help="the markdown file holding the regions")
    args = ap.parse_args(argv)
    old = args.doc.read_text()
    new = render(old)
    if args.check:
        if old == new:
            return 0
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(args.doc),
                                                   "generated from docs/bench_*"))
        return 1
    args.doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
