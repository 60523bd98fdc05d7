"""Camera configurations: which cameras a sample shows and which of them are blacked out.

The straight-driving bias this project targets appears when Alpamayo-R1 sees less than its four
release cameras, so the camera set is an explicit, recorded choice (`Sample.camera_config`):

- `full`: the release four (cross_left, front_wide, cross_right, front_tele).
- `front-masked`: same four-camera token layout, every camera but front_wide replaced by black frames
  (only front_wide is decoded, so a front-only download suffices).
- `front-only`: front_wide alone (`images` has n_cam=1).
- an explicit comma list, e.g. `front_wide,front_tele` or full sensor names; sorted by camera index.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.sample import CAMERA_INDEX, FRONT_CAMERA, RELEASE_CAMERAS

PRESETS = ("full", "front-masked", "front-only")


def _short(name: str) -> str:
    """`camera_front_wide_120fov` -> `front_wide`."""
    return name.removeprefix("camera_").rsplit("_", 1)[0]


SHORT_NAMES: dict[str, str] = {_short(name): name for name in CAMERA_INDEX}


@dataclass(frozen=True)
class CameraConfig:
    """A resolved camera configuration."""

    spec: str  # canonical string recorded in Sample.camera_config
    cameras: tuple[str, ...]  # (n_cam,) sensor names in token order (sorted by CAMERA_INDEX)
    masked: frozenset[str] = frozenset()  # cameras rendered as black frames (never decoded)

    @property
    def decoded(self) -> tuple[str, ...]:
        """Cameras whose video must actually be read."""
        return tuple(c for c in self.cameras if c not in self.masked)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(CAMERA_INDEX[c] for c in self.cameras)


def resolve_camera_config(spec: str | CameraConfig) -> CameraConfig:
    """Parse `full` | `front-masked` | `front-only` | `a,b,...` (short or full sensor names)."""
    if isinstance(spec, CameraConfig):
        return spec
    spec = spec.strip()
    if spec == "full":
        return CameraConfig("full", _sorted(RELEASE_CAMERAS))
    if spec == "front-masked":
        cams = _sorted(RELEASE_CAMERAS)
        return CameraConfig("front-masked", cams, frozenset(c for c in cams if c != FRONT_CAMERA))
    if spec == "front-only":
        return CameraConfig("front-only", (FRONT_CAMERA,))
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError(f"empty camera config {spec!r}; use one of {PRESETS} or a comma list of cameras")
    resolved = []
    for name in names:
        full = name if name in CAMERA_INDEX else SHORT_NAMES.get(name)
        if full is None:
            known = ", ".join(sorted(SHORT_NAMES))
            raise ValueError(f"unknown camera {name!r} in camera config {spec!r}; known: {known}")
        if full in resolved:
            raise ValueError(f"camera {full} listed twice in camera config {spec!r}")
        resolved.append(full)
    cams = _sorted(resolved)
    return CameraConfig(",".join(cams), cams)


def _sorted(cams) -> tuple[str, ...]:
    return tuple(sorted(cams, key=CAMERA_INDEX.__getitem__))
