"""cache-build for Alpamayo 1.5 checkpoints: the 1.5 prompt, navigation text, optional unguided suffix.

Chosen automatically from the checkpoint's `model_type` (shared.release); an R1 checkpoint never
reaches this module, so R1 builds are unchanged. Per sample: the nav text comes from `NavSource`
(none | generate | an official-format annotations JSON), the prompt from shared.prompt15, and with
`--unguided` the prefix's tokens after the route are recomputed without it (cache_builder.unguided).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path

from shared.navigation import NavGenConfig, check_nav_sign, nav_from_future, read_annotations
from shared.prompt15 import build_vlm_inputs15, prompt_provenance
from shared.sample import Sample

from .unguided import unguided_suffix

NAV_CONFLICTS = ("drop", "keep")


class NavSource:
    """Sample -> nav text or None. `spec`: "none" | "generate" | path of an annotations JSON (picklable).

    Annotation labels whose left/right contradicts the sample's own future egomotion are dropped
    (`conflicts="drop"`, the sample is then built without a route) or kept as given ("keep")."""

    def __init__(self, spec: str = "none", conflicts: str = "drop"):
        if conflicts not in NAV_CONFLICTS:
            raise ValueError(f"--nav-conflicts {conflicts!r}: use one of {', '.join(NAV_CONFLICTS)}")
        self.spec, self.conflicts, self.gen = spec, conflicts, NavGenConfig()
        self.labels: dict[tuple[str, int], str] | None = None
        if spec not in ("none", "generate"):
            if not Path(spec).is_file():
                raise ValueError(f"--navigation {spec!r}: not 'none', 'generate' or an annotations JSON file")
            self.labels = read_annotations(spec)

    def __call__(self, s: Sample) -> str | None:
        if self.spec == "none":
            return None
        if self.labels is None:
            return nav_from_future(s.ego_future_xyz, s.ego_future_rot, self.gen)
        text = self.labels.get((s.clip_id, int(s.t0_us)))
        if text is not None and self.conflicts == "drop" and check_nav_sign(text, s.ego_future_xyz,
                                                                            s.ego_future_rot, self.gen) is False:
            return None
        return text

    def identity(self) -> dict:
        out = {"source": self.spec if self.labels is None else "annotations", "conflicts": self.conflicts}
        if self.labels is not None:
            out.update(path=str(Path(self.spec).resolve()), entries=len(self.labels),
                       sha256=hashlib.sha256(Path(self.spec).read_bytes()).hexdigest())
        if self.spec != "none":
            out["generator"] = asdict(self.gen)
        return out


def inputs15(processor, s: Sample, mode: str, nav: NavSource, pixels: str = "inference") -> dict:
    """The 1.5 VLM inputs of one sample (build_vlm_inputs15: + camera_ids, nav_text, route_span)."""
    return build_vlm_inputs15(processor, s, mode=mode, nav_text=nav(s), cot=s.cot if mode == "given-cot" else None,
                              pixels=pixels)


def attach15(rec, inputs: dict, k, v, rope_delta, vlm, unguided: bool) -> None:
    """Fill a record's 1.5 fields; with `unguided` and a route, the suffix KV (device, kv dtype).

    k, v: (layers, kv_heads, L, head_dim) the guided prefix on the VLM's device."""
    rec.camera_ids = tuple(int(c) for c in inputs["camera_ids"])
    rec.nav_text, rec.route_span = inputs["nav_text"], inputs["route_span"]
    if unguided and rec.route_span is not None:
        L = int(inputs["prefix_len"])
        uk, uv = unguided_suffix(vlm, inputs["input_ids"][:, :L], k[:, None], v[:, None], rec.route_span, int(rope_delta))
        rec.unguided_k, rec.unguided_v = uk[:, 0].to(rec.k.dtype), uv[:, 0].to(rec.k.dtype)


def provenance15(mode: str, nav: NavSource, unguided: bool) -> dict:
    """Keys a 1.5 store adds to its provenance (a resumed build must match them)."""
    return {"prompt": prompt_provenance(mode), "navigation": {**nav.identity(), "unguided_suffix": unguided}}
