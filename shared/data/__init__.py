"""Dataset access for PhysicalAI-AV: local-copy reader, camera configs, curation, synthetic world.

from shared.data import open_dataset, load_sample, iter_samples, write_synthetic_world
"""

from shared.data.cameras import CameraConfig, resolve_camera_config
from shared.data.curation import (
    CurvatureStats,
    KeyframeStrategy,
    curvature_profile,
    curvature_stats,
    hash_split,
    parse_keyframe_strategy,
    select_keyframes,
    turn_onsets,
    valid_t0_range,
)
from shared.data.errors import ClipDataError, DatasetLayoutError, SkipItem, SkipReport
from shared.data.reader import (
    ClipReader,
    LocalDataset,
    SampleIterator,
    iter_samples,
    load_sample,
    open_dataset,
)
from shared.data.synthetic import ClipTruth, corrupt_clip, load_truth, write_synthetic_world

__all__ = [
    "CameraConfig",
    "ClipDataError",
    "ClipReader",
    "ClipTruth",
    "CurvatureStats",
    "DatasetLayoutError",
    "KeyframeStrategy",
    "LocalDataset",
    "SampleIterator",
    "SkipItem",
    "SkipReport",
    "corrupt_clip",
    "curvature_profile",
    "curvature_stats",
    "hash_split",
    "iter_samples",
    "load_sample",
    "load_truth",
    "open_dataset",
    "parse_keyframe_strategy",
    "resolve_camera_config",
    "select_keyframes",
    "turn_onsets",
    "valid_t0_range",
    "write_synthetic_world",
]
