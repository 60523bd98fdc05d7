"""Navigation labels: official-format parsing, annotations JSON, generation from the future path with the
left/right sign checked against the egomotion (x forward, y left)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.navigation import check_nav_sign, format_nav, nav_from_future, parse_nav, read_annotations


def path(kappa: float, straight_m: float = 10.0, speed: float = 5.0):
    """64 future poses at 10 Hz: straight for `straight_m`, then a constant-curvature arc (kappa > 0: left)."""
    s = speed * 0.1 * np.arange(1, 65)  # arc length of each waypoint
    yaw = np.where(s > straight_m, kappa * (s - straight_m), 0.0)
    # exact integration of a straight line + circular arc
    x = np.where(s > straight_m, straight_m + (np.sin(yaw) / kappa if kappa else s - straight_m), s)
    y = np.where(s > straight_m, (1 - np.cos(yaw)) / kappa if kappa else 0.0, 0.0)
    rot = np.zeros((64, 3, 3))
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1], rot[:, 2, 2] = np.cos(yaw), -np.sin(yaw), np.sin(yaw), np.cos(yaw), 1
    return np.stack([x, y, np.zeros(64)], 1), rot


def test_generated_text_has_direction_and_onset_distance():
    # onset at 10 deg: yaw = 0.1 (s - 10) >= 0.1745 -> s >= 11.75 -> first waypoint at s = 12.0
    assert nav_from_future(*path(0.1)) == "Turn left in 12m"
    assert nav_from_future(*path(-0.1)) == "Turn right in 12m"
    assert nav_from_future(*path(0.1, straight_m=25.0)) == "Turn left in 27m"
    assert nav_from_future(*path(0.0)) is None  # straight: no route text
    assert nav_from_future(*path(0.005)) is None  # total heading change 0.11 rad < 30 deg


def test_sign_check_against_egomotion():
    left = path(0.1)
    assert check_nav_sign("Turn left in 11m", *left) is True
    assert check_nav_sign("Turn right in 11m", *left) is False
    assert check_nav_sign("Turn left onto De La Cruz Boulevard in 40m", *path(-0.1)) is False
    assert check_nav_sign("Keep going", *left) is None and check_nav_sign("Turn left in 3m", *path(0.0)) is None


def test_parse_and_format():
    assert parse_nav("Turn left in 11m") == ("left", 11)
    assert parse_nav("Turn right onto Main St in 130m") == ("right", 130)
    assert parse_nav("Turn around") is None
    assert format_nav("left", 10.5) == "Turn left in 10m" and format_nav("right", 11.5) == "Turn right in 12m"
    with pytest.raises(ValueError, match="direction"):
        format_nav("up", 3)


def test_read_annotations_official_fields(tmp_path):
    entries = [
        {"clip_id": "a", "t0": 1_700_000_005_100_000, "clip_start_timestamp": 1_700_000_000_000_000,
         "t0_relative": 5_100_000, "nav_text": "Turn left in 11m", "nav_maneuver": "TURN_LEFT", "distance_m": 10.8,
         "cot": "..."},
        {"clip_id": "b", "t0_relative": 3_000_000.0, "nav_text": "Turn right in 30m"},
        {"clip_id": "c", "t0_relative": 1, "nav_text": None},
    ]
    (tmp_path / "list.json").write_text(json.dumps(entries))
    (tmp_path / "obj.json").write_text(json.dumps({"samples": entries}))
    want = {("a", 5_100_000): "Turn left in 11m", ("b", 3_000_000): "Turn right in 30m"}
    assert read_annotations(tmp_path / "list.json") == want == read_annotations(tmp_path / "obj.json")
    (tmp_path / "dup.json").write_text(json.dumps(entries[:1] * 2))
    with pytest.raises(ValueError, match="repeats"):
        read_annotations(tmp_path / "dup.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"nav_text": "x"}]))
    with pytest.raises(ValueError, match="lacks clip_id"):
        read_annotations(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="cannot read"):
        read_annotations(tmp_path / "missing.json")
