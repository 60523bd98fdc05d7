"""Random outages of a remote store's endpoint (issue 13; docs/RELIABILITY.md has the table it fills).

Each trial stops the S3 server (moto on loopback, tests/s3_endpoint.py) for a random 0.3-3 s while
(build) a StoreWriter, with writer threads or one writer process, writes 8 samples to a fresh s3://
prefix, the outage starting once a random number of them are queued; or (read) a Store reads every
sample of a built store, the outage starting at a random sample. The retry budget is 1.5 s, so some
outages are ridden out and some are not. Outcomes:

  recovered              the build finished / every read returned: verify clean, every sample exactly
                         once, K/V/hidden/trajectories bitwise equal to a local reference build
  refused, then recovered past the budget: one line (StoreUnavailableError) naming the path or the
                         sample, the store verifies, then a resume (build) / a re-read (read) gives the above
  lost data / silently wrong / harness error

    PYTHONPATH=. python bench/remote_outage.py --trials 20 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from s3_endpoint import S3Endpoint  # noqa: E402
from test_faults_remote import N, write_with_outage  # noqa: E402
from test_store_ops import assert_stores_equal, produce  # noqa: E402

from shared.store import Store, StoreError, StoreUnavailableError  # noqa: E402

BUDGET = {"attempts": 30, "first_delay_s": 0.1, "max_delay_s": 0.4, "budget_s": 1.5}
RESUME = {**BUDGET, "budget_s": 30}


def check(url: str, s3: S3Endpoint, ref: Store, got: dict | None = None) -> str:
    st = Store.open(url, storage_options=s3.options)
    if len(st) < N or st.keys() != ref.keys():
        return f"lost data ({len(st)} of {N})"
    rep = st.verify()
    if not rep.ok or rep.warnings or st._duplicates:
        return f"silently wrong: {rep}"
    try:
        assert_stores_equal(st, ref)
        for key, x in (got or {}).items():  # what the reads returned during the outage
            y = ref.read(key)
            assert all(torch.equal(a.view(torch.int16), b.view(torch.int16))  # bf16 bits
                       for a, b in ((x.k, y.k), (x.v, y.v), (x.hidden, y.hidden)))
    except AssertionError as e:
        return f"silently wrong: {e}"
    return "ok"


def trial(rng: random.Random, s3: S3Endpoint, ref: Store, n: int) -> dict:
    kind = rng.choice(["build", "read"])
    row = {"trial": n, "kind": kind, "outage_s": round(rng.uniform(0.3, 3.0), 2), "at": rng.randrange(1, N - 1)}
    url = f"s3://kvcache/t{n}"
    so = {**s3.options, "retry": BUDGET}
    got, refused = {}, None
    if kind == "build":
        row["writer_processes"] = rng.choice([0, 1])
        try:
            write_with_outage(url, so, lambda: s3.outage(row["outage_s"]), row["at"], row["writer_processes"])
        except StoreError as e:
            refused = str(e)
            s3.wait_up()
            row["committed_before_resume"] = len(Store.open(url, storage_options=s3.options))
            write_with_outage(url, {**s3.options, "retry": RESUME}, None, N, row["writer_processes"])  # after=N: no outage
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            produce(url, N, 0, 1, storage_options=s3.options)
        st = Store.open(url, storage_options=so)
        for i, key in enumerate(st.keys()):
            if i == row["at"]:
                s3.outage(row["outage_s"])
            try:
                got[key] = st.read(key)
            except StoreUnavailableError as e:
                refused = refused or str(e)
                s3.wait_up()
                got[key] = st.read(key)
    s3.wait_up()
    verdict = check(url, s3, ref, got)
    if refused is not None:
        row["message"] = refused
        one_line = "\n" not in refused and "the store did not answer" in refused
        verdict = verdict if verdict != "ok" else ("ok" if one_line else "harness: message not one line")
    row["outcome"] = ("refused with message, then recovered" if refused else "recovered") if verdict == "ok" else verdict
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="random outage trials")
    ap.add_argument("--seed", type=int, default=0, help="seed of the trial draws")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="remote-outage-ref-") as d, S3Endpoint() as s3:
        with contextlib.redirect_stdout(io.StringIO()):
            produce(str(Path(d) / "c"), N, 0, 1)
        ref = Store.open(str(Path(d) / "c"))
        for n in range(a.trials):
            t = time.time()
            try:
                row = trial(rng, s3, ref, n)
            except Exception as e:  # noqa: BLE001 - a trial that breaks the harness is reported, not fatal
                s3.wait_up()
                row = {"trial": n, "outcome": f"harness error: {type(e).__name__}: {e}"}
            row["seconds"] = round(time.time() - t, 1)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "message"}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| kind | trials | outage s (min-max) | outcomes |\n|---|---|---|---|")
    for kind in ("build", "read"):
        rs = [r for r in rows if r.get("kind") == kind]
        if rs:
            c = Counter(r["outcome"] for r in rs)
            span = f"{min(r['outage_s'] for r in rs)}-{max(r['outage_s'] for r in rs)}"
            print(f"| {kind} | {len(rs)} | {span} | " + ", ".join(f"{v}x {k}" for k, v in sorted(c.items())) + " |")
    bad = sum(1 for r in rows if not r["outcome"].startswith(("recovered", "refused with message")))
    print(f"\n{len(rows)} trials, {len(rows) - bad} recovered, {bad} not ({(time.time() - t0) / 60:.1f} min)")
    for kind in ("build", "read"):  # one message of each kind, as the user sees it
        r = next((r for r in rows if r.get("kind") == kind and "message" in r), None)
        if r is not None:
            print(f"  trial {r['trial']} ({kind}): {r['message']}")


if __name__ == "__main__":
    main()
