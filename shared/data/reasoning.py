"""Reasoning (chain-of-causation) text for `given-cot` prefixes.

Sources: the dataset's `reasoning/ood_reasoning.parquet` (index clip_id; column `events`: a JSON
string or list of {event_start_timestamp: clip-relative us, cot: str}), or a user JSON file mapping
a sample key (`clip@t0:cameras`) or a clip id to text. A clip-level event is used for a keyframe
when its start lies within `tolerance_us` of t0 (the recipes use event starts as keyframes).
"""

from __future__ import annotations

import json
from pathlib import Path

REASONING_PARQUET = "reasoning/ood_reasoning.parquet"


class ReasoningIndex:
    def __init__(self, by_key: dict[str, str] | None = None, events: dict[str, list[tuple[int, str]]] | None = None,
                 tolerance_us: int = 1_000_000):
        self.by_key = by_key or {}
        self.events = events or {}
        self.tolerance_us = tolerance_us

    def __len__(self) -> int:
        return len(self.by_key) + sum(map(len, self.events.values()))

    @classmethod
    def from_json(cls, path: str | Path) -> ReasoningIndex:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object mapping sample keys or clip ids to reasoning text")
        return cls(by_key=dict(data))

    @classmethod
    def from_dataset(cls, root: str | Path) -> ReasoningIndex:
        import pandas as pd

        path = Path(root) / REASONING_PARQUET
        if not path.is_file():
            return cls()
        df = pd.read_parquet(path)
        if "events" not in df.columns:
            raise ValueError(f"{path}: no 'events' column")
        events: dict[str, list[tuple[int, str]]] = {}
        for clip_id, raw in df["events"].items():
            items = json.loads(raw) if isinstance(raw, str) else list(raw)
            events[str(clip_id)] = sorted((int(e["event_start_timestamp"]), str(e["cot"])) for e in items)
        return cls(events=events)

    def lookup(self, clip_id: str, t0_us: int, key: str | None = None) -> str | None:
        if key is not None and key in self.by_key:
            return self.by_key[key]
        if clip_id in self.by_key:
            return self.by_key[clip_id]
        best = min(self.events.get(clip_id, []), key=lambda e: abs(e[0] - t0_us), default=None)
        if best is not None and abs(best[0] - t0_us) <= self.tolerance_us:
            return best[1]
        return None
