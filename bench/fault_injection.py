"""Long fault-injection runs of cache-build (issue 13; docs/RELIABILITY.md has the table they fill).

Each trial starts `cache-build` on the tiny checkpoint and a synthetic world, stops it at a random point
and checks what is left, then resumes and compares with an uninterrupted build:

  kill    SIGKILL while a failpoint holds the build (shared/failpoints.py) at a random hit of: prefill,
          chunk_write (a half-written chunk file), before_commit (a whole sample without its manifest),
          manifest_write (half a manifest in its tmp file), index_write (half an index snapshot); or
          at a random time (`time`). The torn state is asserted to exist before the kill.
  enospc  the disk fills at a random chunk write: cache-build must exit 2 with one line naming the
          cause; then --resume (space "freed").
  shard   a second cache-build of the same shard while the first is held: it must refuse (exit 2).

Outcome per trial: recovered (resume verifies clean, every sample once, bitwise equal to the reference)
| refused with message | lost data | silently wrong | harness error.

`--train` runs head-train instead (tiny checkpoint, CPU, fp32, a 12-sample store): SIGKILL while a
failpoint holds it at a random hit of train_batch (mid-run), ckpt_file_write (a checkpoint file cut in
half), ckpt_before_rename, ckpt_after_rename, ckpt_prune, best_write (a best head renamed before its
index), or at a random time; the torn state is asserted before the kill; then `--resume`. Recovered =
the final head bitwise equal to an uninterrupted run, metrics.jsonl equal (timings aside), the best-k
index equal, and the resume started from a whole checkpoint.

    PYTHONPATH=. python bench/fault_injection.py --trials 24 --seed 0 --out /tmp/faults
    PYTHONPATH=. python bench/fault_injection.py --train --trials 12 --seed 0 --out /tmp/faults-train
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.store import Store  # noqa: E402

POINTS = ("prefill", "chunk_write", "before_commit", "manifest_write", "index_write", "time")


def cli(world: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cache_builder.cache_build", "--dataset", str(world), "--checkpoint", str(ckpt),
            "--out", str(out), "--kv-dtype", "float32", "--cameras", "front-only", "--keyframes", "stride:2",
            "--batch-size", "1", *extra]


def start(cmd: list[str], failpoints: str = "", marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ALPAMAYO_FAILPOINTS": failpoints,
           "ALPAMAYO_FAILPOINTS_MARKER": str(marker or ""), "TQDM_DISABLE": "1"}
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_marker(marker: Path, p: subprocess.Popen, timeout: float = 600) -> dict | None:
    end = time.time() + timeout
    while time.time() < end:
        if marker.exists() and marker.read_text().strip():
            return json.loads(marker.read_text().splitlines()[0])
        if p.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def interrupt(cmd: list[str], point: str, hit_n: int, marker: Path, delay: float, row: dict,
              after: Path | None = None):
    """Start `cmd` and stop it: held at the point's hit_n-th hit (-> the marker line; None if the process
    ended first), or for point "time" `delay` seconds after the start (or after `after` appears: the
    work itself, not the imports) (-> {}). The caller checks, then kills."""
    if point == "time":
        row["hit"] = f"{delay:.1f}s" + (f" after {after.name} appeared" if after else "")
        p = start(cmd)
        while after is not None and not after.exists() and p.poll() is None:
            time.sleep(0.02)
        time.sleep(delay)
        return p, {}
    p = start(cmd, f"{point}=hold@{hit_n}", marker)
    return p, wait_marker(marker, p)


def finish(row: dict, rows: list[dict], out: Path, t0: float) -> None:
    row["seconds"] = round(time.time() - t0, 1)
    rows.append(row)
    print(json.dumps(row), flush=True)
    shutil.rmtree(out, ignore_errors=True)


def not_reached(p: subprocess.Popen, row: dict, rows: list[dict]) -> None:
    kill(p)
    row.update(outcome=f"harness: point not reached (rc {p.returncode}): {p.stderr.read()[-300:]}")
    rows.append(row)
    print(json.dumps(row), flush=True)


def torn_state(out: Path, point: str, hit: dict) -> bool:
    """The state the point is about exists right now (so the kill tests something)."""
    commits = list((out / "commits").glob("*/*.json"))
    committed = {p.stem for p in commits}
    if point == "chunk_write":
        return (out / "samples" / hit["sid"] / hit["file"]).exists() and hit["sid"] not in committed
    if point == "before_commit":
        return any((out / "samples" / hit["sid"]).glob("kv/c.*")) and hit["sid"] not in committed
    if point == "manifest_write":
        return bool(list((out / "commits").glob("*/*.json.tmp-failpoint")))
    if point == "index_write":
        return bool(list((out / "index").glob("*.json.tmp-failpoint")))
    return True  # prefill / time: nothing half-written is promised


def compare(out: Path, ref: Store) -> str:
    try:
        st = Store.open(str(out))
    except Exception as e:  # noqa: BLE001
        return f"lost data (store unreadable: {e})"
    rep = st.verify()
    if not rep.ok or rep.warnings:
        return f"refused with message (verify: {rep.errors[:2] or rep.warnings[:2]})"
    if st.keys() != ref.keys() or st._duplicates:
        return f"lost data ({len(set(ref.keys()) - set(st.keys()))} missing, {len(st._duplicates)} duplicated)"
    for k in ref.keys():
        a, b = st.read(k), ref.read(k)
        if not (torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.hidden, b.hidden)
                and (a.gt_action == b.gt_action).all() and a.token_ids.equal(b.token_ids)):
            return f"silently wrong ({k})"
    return "recovered"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--enospc", type=int, default=3, help="extra disk-full trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/fault-injection")
    ap.add_argument("--train", action="store_true", help="kill head-train instead of cache-build")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if a.train:
        return train_trials(work, a.trials, rng)
    from shared.data import write_synthetic_world
    from shared.tiny_checkpoint import write_tiny_checkpoint

    world = work / "world"
    write_synthetic_world(world, n_clips=3, seed=5, width=160, height=96, duration_s=10.0,
                          kinds=["sharp-left", "straight", "sharp-right"])
    ckpt = write_tiny_checkpoint(work / "tiny", dtype=torch.float32)
    t = time.time()
    r = subprocess.run(cli(world, ckpt, work / "ref"), env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                       capture_output=True, text=True)
    ref_s = time.time() - t
    assert r.returncode == 0, r.stderr[-3000:]
    ref = Store.open(str(work / "ref"))
    S = len(ref)
    cps = sum(1 for f in ref.manifest(0)["files"] if "/c." in f)
    print(f"reference: {S} samples, {cps} chunk files each, {ref_s:.0f} s", flush=True)
    rows = []
    plan = [("kill", POINTS[i % len(POINTS)]) for i in range(a.trials)] + [("enospc", "chunk_write")] * a.enospc
    plan.append(("shard", "before_commit"))
    for n, (kind, point) in enumerate(plan):
        procs = rng.choice((0, 2))
        share = S if procs == 0 else max(1, S // 2)  # each writer process counts its own hits
        hit_n = {"prefill": rng.randint(1, S), "chunk_write": rng.randint(1, share * cps),
                 "before_commit": rng.randint(1, share), "manifest_write": rng.randint(1, share),
                 "index_write": 1, "time": 0}[point]
        out, marker = work / f"t{n:02d}", work / f"t{n:02d}.marker"
        cmd = cli(world, ckpt, out, "--writer-processes", str(procs))
        row = {"trial": n, "kind": kind, "point": point, "hit": hit_n, "writer_processes": procs}
        t = time.time()
        if kind == "kill":
            p, hit = interrupt(cmd, point, hit_n, marker, rng.uniform(0.3, 1.0) * ref_s, row)
            if hit is None:
                not_reached(p, row, rows)
                continue
            row["torn_state_seen"] = torn_state(out, point, hit) if point != "time" else None
            kill(p)
        elif kind == "enospc":
            p = start(cmd, f"{point}=enospc@{hit_n}")
            _, err = p.communicate()
            errs = [ln for ln in err.splitlines() if ln.startswith("cache-build: error:")]  # (torch import warnings
            row["rc"], row["stderr"] = p.returncode, errs[-1] if errs else err[-300:]  # may precede it)
            row["one_line_error"] = (p.returncode == 2 and len(errs) == 1 and "No space left" in errs[0]
                                     and "Traceback" not in err)
        else:  # a second build of the same shard while the first is held
            p = start(cmd, "before_commit=hold@1", marker)
            wait_marker(marker, p)
            q = subprocess.run(cli(world, ckpt, out, "--resume"), env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                               capture_output=True, text=True)
            row["second_rc"], row["second_stderr"] = q.returncode, q.stderr.strip().splitlines()[-1:]
            kill(p)
        committed = len(list(out.glob("commits/*/*.json")))
        r = subprocess.run(cli(world, ckpt, out, "--resume", "--writer-processes", str(procs)),
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, text=True)
        row["committed_before_resume"] = committed
        if r.returncode != 0:
            row["outcome"] = f"resume failed rc {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        else:
            summary = json.loads(r.stdout[r.stdout.index("{"):])
            row["resume_written"], row["resume_already_done"] = summary["written"], summary["already_done"]
            row["outcome"] = compare(out, ref)
            if summary["written"] + summary["already_done"] != S:
                row["outcome"] += f" (resume counted {summary['written']}+{summary['already_done']} != {S})"
        if kind == "enospc" and not row["one_line_error"]:
            row["outcome"] += "; error was not one line naming ENOSPC"
        if kind == "shard" and row["second_rc"] != 2:
            row["outcome"] += "; the second build did not refuse"
        finish(row, rows, out, t)
    return report(work, rows)


def report(work: Path, rows: list[dict]) -> int:
    """results.json + the markdown table; exit 1 unless every trial recovered."""
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    by: dict[tuple, list] = {}
    for r in rows:
        by.setdefault((r["kind"], r["point"]), []).append(r["outcome"])
    print("\n| fault | point | trials | outcomes |\n|---|---|---|---|")
    for (kind, point), outs in by.items():
        counts: dict[str, int] = {}
        for o in outs:
            counts[o] = counts.get(o, 0) + 1
        print(f"| {kind} | {point} | {len(outs)} | {', '.join(f'{v}x {k}' for k, v in counts.items())} |")
    bad = [r for r in rows if r["outcome"] != "recovered"]
    return int(bool(bad))


# -- head-train ------------------------------------------------------------------------------------
TRAIN_POINTS = ("train_batch", "ckpt_file_write", "ckpt_before_rename", "ckpt_after_rename", "ckpt_prune",
                "best_write", "time")
TRAIN_STEPS, SAVE_EVERY = 8, 2  # checkpoints at 2, 4, 6, 8; validation at 3, 6, 8


def train_cli(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "head_trainer.head_train", "--cache", str(store), "--out", str(out),
            "--steps", str(TRAIN_STEPS), "--batch-size", "2", "--warmup-steps", "1", "--save-every", str(SAVE_EVERY),
            "--keep-last", "1", "--log-every", "1", "--val-every", "3", "--keep-best", "1", "--val-ade-items", "0",
            "--ram-cache-gb", "0", "--no-tensorboard", *extra]


def train_torn_state(out: Path, point: str, hit: dict, ref: Path) -> bool:
    ck = out / "checkpoints"
    if point == "ckpt_file_write":
        torn = ck / f"step_{int(hit['step']):07d}.partial" / hit["file"]
        whole = ref / "checkpoints" / f"step_{TRAIN_STEPS:07d}" / hit["file"]
        return torn.is_file() and torn.stat().st_size < whole.stat().st_size
    if point == "ckpt_before_rename":
        return (Path(hit["dir"]) / "state.json").is_file() and not Path(hit["dir"][: -len(".partial")]).exists()
    if point == "ckpt_after_rename":  # the new one renamed, the older one (if any) not yet pruned
        step = int(hit["step"])
        return Path(hit["dir"]).is_dir() and (step == SAVE_EVERY or (ck / f"step_{step - SAVE_EVERY:07d}").is_dir())
    if point == "ckpt_prune":
        return Path(hit["dir"] + ".deleting").is_dir() and not Path(hit["dir"]).exists()
    if point == "best_write":
        index = out / "best" / "index.json"
        listed = json.loads(index.read_text()) if index.is_file() else []
        return (out / "best" / f"step_{int(hit['step']):07d}").is_dir() and all(
            e["step"] != int(hit["step"]) for e in listed)
    return True  # train_batch / time: nothing half-written is promised


def train_compare(out: Path, ref: Path) -> str:
    from safetensors.torch import load_file

    if not (out / "head.safetensors").is_file():
        return "lost data (no final head)"
    a, b = load_file(str(ref / "head.safetensors")), load_file(str(out / "head.safetensors"))
    if set(a) != set(b) or not all(torch.equal(a[k], b[k]) for k in a):
        return "silently wrong (final head differs)"

    def recs(d: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if k != "samples_per_s"}
                for x in (d / "metrics.jsonl").read_text().splitlines()]

    if recs(out) != recs(ref):
        return "silently wrong (metrics.jsonl differs)"
    if (out / "best/index.json").read_text() != (ref / "best/index.json").read_text():
        return "silently wrong (best/index.json differs)"
    return "recovered"


def train_trials(work: Path, trials: int, rng: random.Random) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from train_store import write_train_store

    from head_trainer import run_dir
    from shared.tiny_checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(work / "tiny", dtype=torch.float32)
    store = write_train_store(work / "store", ckpt)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    p = start(train_cli(store, work / "ref"))  # timed from its first metrics line: the loop, not the imports
    while not (work / "ref" / "metrics.jsonl").exists() and p.poll() is None:
        time.sleep(0.02)
    t = time.time()
    _, err = p.communicate()
    ref_s = time.time() - t
    assert p.returncode == 0, err[-3000:]
    print(f"reference head-train: {TRAIN_STEPS} steps, {ref_s:.1f} s from its first metrics line", flush=True)
    ckpts = TRAIN_STEPS // SAVE_EVERY
    rows = []
    for n in range(trials):
        point = TRAIN_POINTS[n % len(TRAIN_POINTS)]
        background = rng.random() < 0.75
        hit_n = {"train_batch": rng.randint(1, TRAIN_STEPS), "ckpt_file_write": rng.randint(1, 3 * ckpts),
                 "ckpt_before_rename": rng.randint(1, ckpts), "ckpt_after_rename": rng.randint(1, ckpts),
                 "ckpt_prune": rng.randint(1, ckpts - 1), "best_write": 1, "time": 0}[point]
        out, marker = work / f"t{n:02d}", work / f"t{n:02d}.marker"
        extra = () if background else ("--no-background-save",)
        row = {"trial": n, "verb": "head-train", "kind": "kill", "point": point, "hit": hit_n,
               "background_save": background}
        t = time.time()
        p, hit = interrupt(train_cli(store, out, *extra), point, hit_n, marker, rng.uniform(0.0, 1.0) * ref_s, row,
                           after=out / "metrics.jsonl")
        if hit is None:
            not_reached(p, row, rows)
            continue
        row["torn_state_seen"] = train_torn_state(out, point, hit, work / "ref") if point != "time" else None
        finished = p.poll() is not None
        kill(p)
        row["exited_before_kill"] = finished
        latest = run_dir.latest_checkpoint(out)
        row["resumed_from_step"] = int(latest.name.split("_")[1]) if latest else 0
        r = subprocess.run(train_cli(store, out, "--resume", *extra), env=env, cwd=ROOT, capture_output=True,
                           text=True)
        if r.returncode != 0:
            row["outcome"] = f"resume failed rc {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        else:
            row["outcome"] = train_compare(out, work / "ref")
            if row["torn_state_seen"] is False:
                row["outcome"] += " (torn state not seen before the kill)"
        finish(row, rows, out, t)
    return report(work, rows)


if __name__ == "__main__":
    raise SystemExit(main())
