"""Where the store writer's ceiling is on this machine's CPUs (no GPU needed).

    python bench/bench_store_write.py --prefix-len 2993 --samples 24 --threads 4 8 12 --procs 2 4 8

One release-size bf16 sample (36 layers x 8 KV heads x 128, hidden 4096) written again under new keys.
Rows (logical GB/s: KV + hidden as bf16):
  zstd-raw   numcodecs zstd-1 on 12 MB pieces from N threads: compression alone, no zarr, no disk;
  writer-T   one StoreWriter with N threads (one process: one zarr event loop);
  writer-T C the same at the most threads with lossless codec C (blosc-lz4 bitshuffle | none);
  writer-P   N processes, one StoreWriter (1 thread) each, disjoint writer ids, one store.

    python bench/bench_store_write.py --small --threads 1 8

--small: only per-sample writer time of small front-only samples (--small-len tokens, one thumbnail) for
each --small-quants, where the writer's fixed per-sample cost shows rather than its bytes. K/V start on
--device (cuda when there is one: stacking / quantisation run on the GPU, as in cache-build; on the CPU,
quantisation dominates the time). --main-ms M: the main thread also runs M ms of pure Python per sample
(a stand-in for the prefill's kernel launches): ms/sample above max(M, the M=0 row) is what the writer's
Python work and the GIL cost the main thread, and the reverse.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.store import KVSpec, StoreWriter, synthetic_sample  # noqa: E402

PROV = {"checkpoint": None, "head_config_hash": None, "processor": None, "prefix_mode": "teacher",
        "dataset_revision": None, "code_version": "bench"}


def spec(codec: str = "zstd", quant: str = "none") -> KVSpec:
    return KVSpec(36, 8, 128, 4096, "bfloat16", quant, True, codec)


def renamed(base, i: int, tag: str):
    return dataclasses.replace(base, key=f"{tag}{i}@{base.t0_us}:{base.camera_config}", clip_id=f"{tag}{i}")


def write_threads(url: str, base, n: int, threads: int, codec: str = "zstd", sp: KVSpec | None = None
                  ) -> tuple[float, int]:
    w = StoreWriter.create(url, PROV, sp or spec(codec), mode="resume", writer_id=f"t{threads}", workers=threads,
                           max_pending=threads + 2)
    t0 = time.perf_counter()
    for i in range(n):
        w.write(renamed(base, i, f"t{threads}-"))
    w.close()
    return time.perf_counter() - t0, w.bytes_logical


def _proc(url: str, L: int, n: int, rank: int, barrier, out) -> None:
    base = synthetic_sample(rank, spec(), prefix_len=L, outliers=False)
    w = StoreWriter.create(url, PROV, spec(), mode="resume", writer_id=f"p{rank}", workers=1, max_pending=2)
    barrier.wait()
    t0 = time.perf_counter()
    for i in range(n):
        w.write(renamed(base, i, f"p{rank}-"))
    w.close()
    out.put((time.perf_counter() - t0, w.bytes_logical))


def write_procs(url: str, L: int, n: int, procs: int) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_proc, args=(url, L, max(1, n // procs), r, barrier, out)) for r in range(procs)]
    for p in ps:
        p.start()
    barrier.wait()
    res = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return max(t for t, _ in res), sum(b for _, b in res)


def small_rows(args, root: Path) -> None:
    """ms per sample of front-only samples through one StoreWriter, per quantisation and thread count."""
    print(f"{'row':18s} {'N':>3s} {'ms/sample':>10s} {'MB/sample':>10s}   (L={args.small_len}, {args.device})")
    for quant in args.small_quants:
        sp = spec(quant=quant)
        base = synthetic_sample(1, sp, prefix_len=args.small_len, n_cam=1, outliers=False)  # odd seed: front-only
        base = dataclasses.replace(base, k=base.k.to(args.device), v=base.v.to(args.device),
                                   hidden=base.hidden.to(args.device))
        for th in args.threads:
            url = str(root / f"small-{quant}-{th}")
            write_threads(url, renamed(base, 0, "warm-"), 1, th, sp=sp)  # zarr's loop and pools, CUDA context
            for main_ms in sorted({0.0, args.main_ms}):
                w = StoreWriter.create(url, PROV, sp, mode="resume", writer_id=f"m{main_ms:g}", workers=th,
                                       max_pending=th + 2)
                t0 = time.perf_counter()
                for i in range(args.samples):
                    w.write(renamed(base, i, f"s{th}-{main_ms:g}-"))
                    _spin(main_ms / 1e3)
                w.flush()
                dt = time.perf_counter() - t0
                w.close()
                row = f"small {quant}" + (f" +{main_ms:g}ms" if main_ms else "")
                print(f"{row:18s} {th:3d} {dt / args.samples * 1e3:10.1f} {w.bytes_stored / args.samples / 1e6:10.1f}",
                      flush=True)
            shutil.rmtree(url)


def _spin(seconds: float) -> None:
    """Pure-Python work (holds the GIL like a thread launching CUDA kernels) for `seconds` of wall time."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(range(200))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix-len", type=int, default=2993)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--threads", type=int, nargs="*", default=[4, 8, 12])
    ap.add_argument("--procs", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--codecs", nargs="*", default=["blosc-lz4", "none"], help="also: writer-T at the most threads")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--small", action="store_true", help="only the small-sample rows (see the module doc)")
    ap.add_argument("--small-len", type=int, default=809, help="front-only prefix length")
    ap.add_argument("--small-quants", nargs="*", default=["int4", "int8", "none"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--main-ms", type=float, default=50.0, help="--small: also rows with this much main-thread Python")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp())
    if args.small:
        small_rows(args, root)
        return
    base = synthetic_sample(0, spec(), prefix_len=args.prefix_len, outliers=False)
    import numcodecs
    import numpy as np

    raw = base.k.contiguous().view(-1).view(torch.int16).numpy()  # the bf16 bits, as the store keeps them
    pieces = np.array_split(raw, max(1, raw.nbytes // 12_000_000))
    z = numcodecs.Zstd(level=1)
    print(f"{'row':12s} {'N':>3s} {'GB/s':>7s}")
    for th in args.threads:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(th) as ex:
            list(ex.map(z.encode, pieces * 4))
        print(f"{'zstd-raw':12s} {th:3d} {4 * raw.nbytes / (time.perf_counter() - t0) / 1e9:7.2f}", flush=True)
    for th in args.threads:
        url = str(root / f"threads{th}")
        dt, b = write_threads(url, base, args.samples, th)
        print(f"{'writer-T':12s} {th:3d} {b / dt / 1e9:7.2f}", flush=True)
        shutil.rmtree(url)
    for codec in args.codecs:
        th = max(args.threads)
        url = str(root / f"codec-{codec}")
        dt, b = write_threads(url, base, args.samples, th, codec)
        print(f"{'writer-T ' + codec:12s} {th:3d} {b / dt / 1e9:7.2f}", flush=True)
        shutil.rmtree(url)
    for p in args.procs:
        url = str(root / f"procs{p}")
        dt, b = write_procs(url, args.prefix_len, args.samples, p)
        print(f"{'writer-P':12s} {p:3d} {b / dt / 1e9:7.2f}", flush=True)
        shutil.rmtree(url)


if __name__ == "__main__":
    main()
