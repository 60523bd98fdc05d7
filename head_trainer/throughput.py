"""Steady-state throughput of a head-train run, and whether the GPU or the loader bounded it.

The first `skip` steps (compile, CUDA-graph capture, RAM-tier fill) are left out. On CUDA two events
per step, on the compute stream around the step, give the time the GPU spent inside steps; the gaps
between one step's end and the next one's start are time the GPU waited (for the loader's copy or
the host). Nothing here synchronises before `result()`.
"""

from __future__ import annotations

import time

import torch


class SteadyMeter:
    def __init__(self, device: torch.device, skip: int):
        self.cuda, self.skip = device.type == "cuda", skip
        self.seen, self.events = 0, []
        self.t0 = self.t_last = None
        self.wait0 = self.wait1 = 0.0

    def start(self, loader_wait_s: float) -> None:
        """Before a step (after its batch arrived)."""
        if self.seen == self.skip:
            if self.cuda:
                torch.cuda.synchronize()
            self.t0, self.wait0 = time.perf_counter(), loader_wait_s
        if self.seen >= self.skip and self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append([ev, None])

    def stop(self, loader_wait_s: float) -> None:
        """After a step was enqueued (before any checkpoint save)."""
        if self.seen >= self.skip:
            if self.cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                self.events[-1][1] = ev
            self.wait1, self.t_last = loader_wait_s, time.perf_counter()
        self.seen += 1

    def result(self, samples_per_step: int) -> dict:
        """{} when the run had no steady steps; else per-sample time, loader wait and GPU busy fraction."""
        n = self.seen - self.skip
        if n <= 0 or self.t0 is None:
            return {}
        wall = self.t_last - self.t0  # host time; on CUDA the GPU's own span of the steady steps
        busy = None
        if self.cuda:
            self.events[-1][1].synchronize()
            busy = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
            wall = self.events[0][0].elapsed_time(self.events[-1][1]) / 1e3
        wall = max(wall, 1e-9)
        rec = {"steady_steps": n, "steady_samples_per_s": round(n * samples_per_step / wall, 2),
               "steady_ms_per_sample": round(1e3 * wall / (n * samples_per_step), 3),
               "steady_loader_wait_fraction": round((self.wait1 - self.wait0) / wall, 4)}
        if busy is not None:
            rec["gpu_busy_fraction"] = round(busy / wall, 4)
        return rec
