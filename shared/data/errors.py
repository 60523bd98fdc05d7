"""Typed data errors and the skip report that batch tools keep instead of crashing.

A real download has bad clips (missing members, truncated videos, short egomotion). Single-clip
calls raise `ClipDataError` naming the clip, the file and a short reason code; batch tools
(`iter_samples`, `curve-scan`) catch it, record it in a `SkipReport` and move on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Reason codes (stable strings: they appear in reports and tests).
MISSING_FILE = "missing-file"  # a chunk zip / parquet named by features.csv is not on disk
MISSING_MEMBER = "missing-member"  # the chunk zip exists but lacks the clip's member
WRONG_CHUNK = "wrong-chunk"  # the member is in another chunk than clip_index says
CORRUPT_ZIP = "corrupt-zip"  # the chunk zip cannot be opened
CORRUPT_VIDEO = "corrupt-video"  # mp4 cannot be opened or decoded (truncated, garbage)
FRAME_COUNT_MISMATCH = "frame-count-mismatch"  # mp4 frame count != timestamps rows
FRAMES_NOT_COVERED = "frames-not-covered"  # camera frames do not cover t0-0.3 s .. t0
CORRUPT_TABLE = "corrupt-table"  # a parquet member cannot be read or lacks columns
EGOMOTION_COVERAGE = "egomotion-coverage"  # egomotion does not cover the sample window
NAN_VALUES = "nan-values"  # NaN/inf in egomotion values
NON_INCREASING_TIMESTAMPS = "non-increasing-timestamps"  # egomotion or frame timestamps
NOT_IN_INDEX = "clip-not-in-index"  # clip id absent from clip_index.parquet
FEATURE_ABSENT = "feature-absent"  # metadata/feature_presence says the sensor is missing
RESOLUTION_MISMATCH = "resolution-mismatch"  # cameras of one sample decode to different sizes
NO_KEYFRAME = "no-keyframe"  # the keyframe strategy found no valid t0 in the clip
UNEXPECTED = "unexpected-error"  # anything else; recorded so a batch never dies on one clip


class DatasetLayoutError(Exception):
    """The download tree itself is unusable (missing/invalid top-level file); names the file and the fix."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ClipDataError(Exception):
    """One clip cannot be read: `clip_id`, the offending `path` (file or `zip::member`) and a reason code."""

    def __init__(self, clip_id: str, path: str | Path, reason: str, detail: str = ""):
        self.clip_id = clip_id
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        msg = f"clip {clip_id}: {reason} in {self.path}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


@dataclass
class SkipItem:
    clip_id: str
    file: str
    reason: str
    detail: str = ""


@dataclass
class SkipReport:
    """Clips skipped by a batch tool: `.counts` by reason and `.items` (clip_id, file, reason, detail)."""

    items: list[SkipItem] = field(default_factory=list)

    def add(self, err: ClipDataError) -> None:
        self.items.append(SkipItem(err.clip_id, err.path, err.reason, err.detail))

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(item.reason for item in self.items))

    @property
    def clip_ids(self) -> list[str]:
        return [item.clip_id for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict:
        return {
            "n_skipped": len(self.items),
            "counts": self.counts,
            "items": [vars(item).copy() for item in self.items],
        }

    def summary(self) -> str:
        if not self.items:
            return "skipped 0 clips"
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"skipped {len(self.items)} clips ({parts})"
