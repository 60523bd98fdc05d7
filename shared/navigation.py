"""Navigation text for Alpamayo 1.5 samples: from an annotations JSON or generated from the future path.

Format (official demo data): "Turn {left|right} in {N}m", N the distance rounded to whole metres;
street names may sit in between ("Turn left onto X in 40m"). The official recipe reads nav text from
an `annotations_path` JSON whose entries carry `clip_id`, `t0_relative` (clip-relative us, the sample
time) and `nav_text` (plus nav_maneuver, distance_m, cot). The sheet notes that in the official demo
file the left/right of 11 of 17 TURN_LEFT entries disagrees with their reasoning text, so every label
can be checked against the sample's own future egomotion (ego frame at t0: x forward, y left, so a
left turn is a positive yaw change).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .action_space import unwrap, yaw_of

NAV_PATTERN = re.compile(r"^Turn (left|right)\b.*\bin (\d+)\s?m$")


@dataclass(frozen=True)
class NavGenConfig:
    """How `nav_from_future` labels a path (the official code has no generator; these are ours)."""

    min_turn_rad: float = math.radians(30.0)  # total heading change below this: no turn, no route text
    onset_rad: float = math.radians(10.0)  # the manoeuvre starts where the heading has changed this much
    max_lateral_disagree_m: float = 0.5  # |y| at the end beyond this with the opposite sign: ambiguous


def parse_nav(nav_text: str) -> tuple[str, int] | None:
    """("left" | "right", metres) of an official-format text, None for any other text."""
    m = NAV_PATTERN.match(nav_text.strip())
    return (m.group(1), int(m.group(2))) if m else None


def format_nav(direction: str, distance_m: float) -> str:
    if direction not in ("left", "right"):
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")
    return f"Turn {direction} in {int(round(distance_m))}m"


def turn_direction(future_xyz: np.ndarray, future_rot: np.ndarray, cfg: NavGenConfig = NavGenConfig()) -> str | None:
    """"left" / "right" from the future egomotion, None if the path does not turn or yaw and lateral
    displacement disagree. future_xyz (64, 3), future_rot (64, 3, 3) in the ego frame at t0."""
    import torch

    yaw = unwrap(yaw_of(torch.as_tensor(np.asarray(future_rot), dtype=torch.float64))).numpy()  # (64,)
    total = float(yaw[-1])
    if abs(total) < cfg.min_turn_rad:
        return None
    lateral = float(np.asarray(future_xyz)[-1, 1])
    if lateral * total < 0 and abs(lateral) > cfg.max_lateral_disagree_m:
        return None
    return "left" if total > 0 else "right"


def nav_from_future(future_xyz: np.ndarray, future_rot: np.ndarray, cfg: NavGenConfig = NavGenConfig()) -> str | None:
    """Official-format nav text generated from the path: direction from the heading change, distance =
    path length from t0 to the manoeuvre onset. None when the path does not turn (no route)."""
    import torch

    direction = turn_direction(future_xyz, future_rot, cfg)
    if direction is None:
        return None
    yaw = unwrap(yaw_of(torch.as_tensor(np.asarray(future_rot), dtype=torch.float64))).numpy()
    xyz = np.concatenate([np.zeros((1, 3)), np.asarray(future_xyz, dtype=np.float64)])  # t0 at the origin
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xyz[:, :2], axis=0), axis=1))])  # (65,)
    onset = int(np.argmax(np.abs(yaw) >= cfg.onset_rad))  # first future step past the onset
    return format_nav(direction, arc[onset + 1])


def check_nav_sign(nav_text: str, future_xyz: np.ndarray, future_rot: np.ndarray,
                   cfg: NavGenConfig = NavGenConfig()) -> bool | None:
    """True if the text's left/right agrees with the egomotion, False if it contradicts it, None if
    either side has no direction (unparsed text or a path that does not turn)."""
    parsed = parse_nav(nav_text)
    actual = turn_direction(future_xyz, future_rot, cfg)
    if parsed is None or actual is None:
        return None
    return parsed[0] == actual


def read_annotations(path: str | Path) -> dict[tuple[str, int], str]:
    """{(clip_id, t0_relative us): nav_text} from an official-format annotations JSON.

    The file is a list of entries, or an object holding one such list (the demo file's outer form was
    not seen, so both are accepted). Entries without nav_text are skipped; a repeated key is an error.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read navigation annotations ({exc})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a list of entries or an object with one list of entries")
        data = lists[0]
    out: dict[tuple[str, int], str] = {}
    for i, e in enumerate(data):
        if not isinstance(e, dict) or "clip_id" not in e or "t0_relative" not in e:
            raise ValueError(f"{path}: entry {i} lacks clip_id / t0_relative")
        if e.get("nav_text") is None:
            continue
        key = (str(e["clip_id"]), int(e["t0_relative"]))
        if key in out:
            raise ValueError(f"{path}: entry {i} repeats {key}")
        out[key] = str(e["nav_text"])
    return out
