"""Data integrity inside the loop: a NaN/Inf in a batch stops the run and names the sample.

The check runs on the device every step (one isfinite pass over the batch's K/V and actions), but
its result is read only at log, validation and checkpoint steps, so the step never waits on the
host; a bad batch is always caught before any checkpoint that could hold its effect is written.
"""

from __future__ import annotations

import torch


class TrainingStopped(RuntimeError):
    """Training stopped on bad data or a failed read; the run directory resumes from its last checkpoint."""


def finite_per_sample(batch) -> torch.Tensor:
    """(B,) bool on the batch's device: every K, V and action value of sample b is finite."""
    parts = [torch.isfinite(t).flatten(1).all(1) for t in (*batch.prefix.keys, *batch.prefix.values, batch.action)]
    return torch.stack(parts).all(0)


class FiniteGuard:
    def __init__(self):
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []

    def add(self, step: int, micro: list) -> None:
        for b in micro:
            self._pending.append((step, list(b.keys), finite_per_sample(b)))

    def problem(self, resume_hint: str) -> str | None:
        """A message naming the first non-finite sample seen since the last call, or None."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        ok = torch.cat([f for _, _, f in pending]).cpu()
        if bool(ok.all()):
            return None
        pos = int((~ok).nonzero()[0])
        for step, keys, _ in pending:
            if pos < len(keys):
                return (f"step {step + 1}: sample {keys[pos]!r} holds NaN/Inf values in its cached K/V or action; "
                        f"fix or drop it from the store, then {resume_hint}")
            pos -= len(keys)
        return None
