"""Data integrity inside the loop: a NaN/Inf in a batch stops the run and names the sample.

The check runs on the device every step (one isfinite pass over the batch's K/V and actions), but
its result is read only at log, validation and checkpoint steps, so the step never waits on the
host; a bad batch is always caught before any checkpoint that could hold its effect is written.
"""

from __future__ import annotations

import json

import torch


class TrainingStopped(RuntimeError):
    """Training stopped on bad data or a failed read; the run directory resumes from its last checkpoint."""


def finite_rows(tensors) -> torch.Tensor:
    """(B,) bool: row b of every tensor (each (B, ...)) is finite; one tensor at a time, so one layer's K or V
    at a time (a bool copy of all the K/V would be half their size)."""
    return torch.stack([torch.isfinite(t).flatten(1).all(1) for t in tensors]).all(0)


def checked_tensors(batch) -> tuple[torch.Tensor, ...]:
    """What finiteness is checked on: K, V (int8 codes are always finite: their scales instead), action."""
    pre = batch.prefix
    kv = (*pre.key_scales, *pre.value_scales) if pre.quantized else (*pre.keys, *pre.values)
    return (*kv, batch.action)


def finite_per_sample(batch) -> torch.Tensor:
    """(B,) bool on the batch's device: every K, V and action value of sample b is finite."""
    return finite_rows(checked_tensors(batch))


def read_stop(exc: Exception, last_ckpt: str, where: str = "") -> TrainingStopped:
    """A failed read -> the stop: what failed, that the run directory is intact, the ways on."""
    from shared.store import SampleReadError

    skip = "; or add --skip-bad-samples to leave damaged samples out" if isinstance(exc, SampleReadError) else ""
    return TrainingStopped(f"{where}{exc}; the run directory is intact: {last_ckpt}{skip}")


class FiniteGuard:
    def __init__(self):
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []

    def add(self, step: int, micro: list) -> None:
        """Batches whose K/V copy is deferred (the CUDA feeder) are checked as they are copied, on the copy
        stream; the others here, now."""
        for b in micro:
            self._pending.append((step, list(b.keys), b.pending if b.pending is not None else finite_per_sample(b)))

    def problem(self, resume_hint: str) -> str | None:
        """A message naming the first non-finite sample seen since the last call, or None."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        flags = []
        for _, keys, f in pending:
            if not isinstance(f, torch.Tensor):  # a deferred copy: its flags exist once prepared
                if f.finite is None:
                    raise RuntimeError(f"batch {keys} was never prepared: its K/V were not read (a bug)")
                f = f.finite
            flags.append(f)
        ok = torch.cat(flags).cpu()
        if bool(ok.all()):
            return None
        pos = int((~ok).nonzero()[0])
        for step, keys, _ in pending:
            if pos < len(keys):
                return (f"step {step + 1}: sample {keys[pos]!r} holds NaN/Inf values in its cached K/V or action; "
                        f"fix or drop it from the store, then {resume_hint}")
            pos -= len(keys)
        return None


# -- pairings: store x checkpoint x head -----------------------------------------------------------
CHECKPOINT_FIELDS = ("config_sha256", "head_config_hash", "model_type")  # identity fields that change the numbers
STORE_FIELDS = ("processor", "prefix_mode", "pixels", "schema_version")  # what makes the prefixes another input


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _diffs(a: dict, b: dict, keys) -> list[str]:
    """'key: a vs b' for each of `keys` (nested dicts compared field by field) where a and b differ."""
    out = []
    for k in keys:
        fa, fb = _flat({k: a.get(k)}), _flat({k: b.get(k)})
        out += [f"{f} {fa.get(f, '<unset>')!r} vs {fb.get(f, '<unset>')!r}"
                for f in sorted(set(fa) | set(fb)) if fa.get(f, "<unset>") != fb.get(f, "<unset>")]
    return out


def check_store_checkpoint(store, ckpt, flag: str = "--checkpoint") -> None:
    """Refuse a checkpoint that is not the one the store's KV prefixes came from (another model, config
    or head architecture), naming each differing identity field. Fields the store did not record pass."""
    have, want = ckpt.identity(), store.provenance.get("checkpoint") or {}
    diff = _diffs(want, have, [k for k in CHECKPOINT_FIELDS if want.get(k) is not None])
    if diff:
        raise ValueError(f"{flag} {ckpt.path} is not the checkpoint {store.url} was built from "
                         f"({want.get('path', '?')}): {'; '.join(diff)} (store vs checkpoint); pass the checkpoint "
                         "the store records")


def check_head_pairing(head_meta: dict, head_path: str, ckpt, store=None) -> list[str]:
    """A head file against the checkpoint (its head config must be this one: another expert shape is
    refused, naming the fields) and, with `store`, against the store it was trained on: -> the store
    provenance fields that differ (processor, prefix mode, pixels, schema, KV dtype / quantisation),
    for the caller to refuse or accept. A head without training metadata (an export) is not checked."""
    trained = head_meta.get("head_config")
    if trained is not None:
        here = ckpt.head_config().to_dict()
        # fields both sides record (heads written before shared/head.py built from a copy of the config
        # carry the rope fields transformers' config class added to it)
        diff = [d for d in _diffs(json.loads(json.dumps(trained, default=str)), json.loads(json.dumps(here, default=str)),
                                  sorted(set(trained) | set(here))) if "'<unset>'" not in d]
        if diff:
            raise ValueError(f"{head_path} is a head of another architecture than {ckpt.path}: "
                             f"{'; '.join(diff[:6])} (head vs checkpoint)")
    if store is None or "cache" not in head_meta:
        return []
    here = {**store.provenance, "schema_version": store.schema_version}
    return [d for d in _diffs(head_meta["cache"].get("provenance") or {}, here, STORE_FIELDS)
            if "'<unset>'" not in d.split(" vs ")[0]]
