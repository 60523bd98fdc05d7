"""Store IO on CPU: write / read throughput and bytes per sample for each codec, quantisation and layout.

    python bench/bench_store_io.py                      # Qwen3-VL-8B shapes, L=800 (1 camera), 3 samples
    python bench/bench_store_io.py --tokens 3000 --samples 2

Throughput is logical MB/s (MB of K+V in bf16 delivered per second, whatever is stored), as in
/work/shared/docs/kv-storage.md. Reads are warm (page cache): they measure decode, the trainer's CPU
cost. Data: shared.store.synthetic_sample (Qwen3-like keys with outlier channels), so ratios are close
to the measured real-activation ratios but not identical. Results go in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

import torch

from shared import kv_quant
from shared.store import KVSpec, Store, StoreWriter, estimate_sample_bytes, synthetic_sample

PROV = dict(checkpoint="bench", head_config_hash="bench", processor="bench", prefix_mode="bench",
            dataset_revision="bench", code_version="bench")

# (label, kv_dtype, quant, codec, chunk_mb, shard)
CONFIGS = [
    ("bf16 zstd-1 8MB chunks (default)", "bfloat16", "none", "zstd", 8.0, False),
    ("bf16 zstd-1 4MB chunks", "bfloat16", "none", "zstd", 4.0, False),
    ("bf16 zstd-1 16MB chunks", "bfloat16", "none", "zstd", 16.0, False),
    ("bf16 zstd-1 sharded", "bfloat16", "none", "zstd", 8.0, True),
    ("bf16 blosc-lz4-bitshuffle", "bfloat16", "none", "blosc-lz4", 8.0, False),
    ("bf16 raw", "bfloat16", "none", "none", 8.0, False),
    ("int8 zstd-1", "bfloat16", "int8", "zstd", 8.0, False),
    ("int8 raw", "bfloat16", "int8", "none", 8.0, False),
    ("int4 zstd-1", "bfloat16", "int4", "zstd", 8.0, False),
]


def _files(path: str) -> int:
    return sum(len(f) for _, _, f in os.walk(path))


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(os.cpu_count() or 1)
    base = KVSpec(args.layers, args.heads, args.head_dim, args.hidden, store_hidden=not args.no_hidden)
    proto = synthetic_sample(0, base, prefix_len=args.tokens, n_cam=4)
    samples = [dataclasses.replace(proto, clip_id=f"b{i}", key=f"b{i}@{proto.t0_us}:{proto.camera_config}")
               for i in range(args.samples)]
    kv_mb = 2 * proto.k.numel() * 2 / 1e6  # logical bf16 MB of K+V per sample
    rows = []
    root = tempfile.mkdtemp(prefix="bench-store-", dir=args.dir)
    try:
        for label, dt, quant, codec, chunk_mb, shard in CONFIGS:
            if args.only and not any(o in label for o in args.only):
                continue
            spec = dataclasses.replace(base, kv_dtype=dt, quant=quant, codec=codec, chunk_mb=chunk_mb, shard=shard)
            url = os.path.join(root, label.replace(" ", "_"))
            t0 = time.perf_counter()
            with StoreWriter.create(url, PROV, spec, workers=2, max_pending=2) as w:
                for s in samples:
                    w.write(s)
            t_write = time.perf_counter() - t0
            st = Store.open(url)
            st.read(0)  # warm the page cache
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                for i in range(len(st)):
                    r = st.read(i, with_hidden=False)
            t_read = (time.perf_counter() - t0) / args.repeats
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                for i in range(len(st)):
                    for n in st.manifest(i)["arrays"]:
                        if n == "kv" or n.startswith("q_"):
                            st.read_stored(i, n)
            t_dec = (time.perf_counter() - t0) / args.repeats
            t0 = time.perf_counter()
            for i in range(len(st)):
                st.read(i, layers=range(4), with_hidden=False)
            t_sub = time.perf_counter() - t0
            m = st.manifest(0)
            kv_dir = os.path.join(url, "samples", m["sid"], "kv")
            kv_bytes = sum(os.path.getsize(os.path.join(kv_dir, f)) for f in os.listdir(kv_dir))
            for n in m["arrays"]:
                if n.startswith("q_"):
                    d = os.path.join(url, "samples", m["sid"], n)
                    kv_bytes += sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
            ek = kv_quant.rel_rmse(samples[-1].k, r.k) if quant != "none" else 0.0
            ev = kv_quant.rel_rmse(samples[-1].v, r.v) if quant != "none" else 0.0
            est = estimate_sample_bytes(spec, args.tokens, n_cam=4)
            rows.append(dict(
                label=label, kv_ratio=kv_mb * 1e6 / kv_bytes, stored_mb=m["bytes_stored"] / 1e6,
                est_mb=est.stored_bytes / 1e6, files=_files(os.path.join(url, "samples", m["sid"])) + 1,
                write=args.samples * kv_mb / t_write, read=args.samples * kv_mb / t_read,
                decode=args.samples * kv_mb / t_dec,
                read4=args.samples * kv_mb * 4 / args.layers / t_sub, ek=ek, ev=ev,
            ))
            shutil.rmtree(url)
            print(_fmt(rows[-1]), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


HEADER = ("| config | KV ratio vs bf16 | stored MB/sample (est.) | files/sample | write MB/s | decode MB/s "
          "| read() MB/s | 4-layer read() MB/s | K / V rel-RMSE |\n|---|---|---|---|---|---|---|---|---|")


def _fmt(r: dict) -> str:
    err = "lossless" if r["ek"] == 0 else f"{r['ek']:.4f} / {r['ev']:.4f}"
    return (f"| {r['label']} | {r['kv_ratio']:.2f} | {r['stored_mb']:.1f} ({r['est_mb']:.1f}) | {r['files']} | "
            f"{r['write']:.0f} | {r['decode']:.0f} | {r['read']:.0f} | {r['read4']:.0f} | {err} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=36, help="KV layers (Qwen3-VL-8B: 36)")
    p.add_argument("--heads", type=int, default=8, help="KV heads (8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (128)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (4096)")
    p.add_argument("--tokens", type=int, default=800, help="prefix length L per sample (809 = 1 camera)")
    p.add_argument("--samples", type=int, default=3, help="samples per configuration")
    p.add_argument("--repeats", type=int, default=2, help="warm read passes over the store")
    p.add_argument("--no-hidden", action="store_true", help="do not store hidden states")
    p.add_argument("--only", nargs="*", default=None, help="run only configs whose label contains one of these")
    p.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = p.parse_args()
    print(f"# {args.samples} samples x L={args.tokens}, {args.layers}x{args.heads}x{args.head_dim}, "
          f"hidden {args.hidden}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(HEADER)
    run(args)


if __name__ == "__main__":
    main()
