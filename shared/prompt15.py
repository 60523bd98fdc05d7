"""The VLM input of one sample as Alpamayo 1.5 builds it (docs/ALPAMAYO_1_5.md, sheet §3).

Differences from R1 (shared.prompt), everything else unchanged:
- Camera labels: for each camera `"{display name}: "` once, then `"frame {k} "` before each of its
  images (k = 0..3, oldest first), cameras in ascending index order; any subset of cameras.
  The Qwen template concatenates text items, so a camera renders as
  `Front camera: frame 0 <V>frame 1 <V>...` (helper.py `_build_image_content`).
- Navigation: optional `<|route_start|>{nav_text}<|route_end|>` between `<|traj_history_end|>` and
  the instruction; nothing at all without nav text.
- Layout: chosen explicitly, as in R1: "teacher" = the official SFT recipe ("output the future
  trajectory.", assistant `<|traj_future_start|>`); "rollout" / "given-cot" = chain-of-causation.
  `prompt_provenance` is what a store records about the choice.
"""

from __future__ import annotations

import numpy as np
import torch

from shared import prompt as P
from shared.images import MAX_PIXELS, MIN_PIXELS
from shared.qwen_files import alpamayo_token_ids
from shared.sample import Sample

PROMPT_FORMAT = "alpamayo1_5/v1"
FRAMES_PER_CAMERA = 4
# helper.py CAMERA_DISPLAY_NAMES (index -> text); any other index renders as "Camera {index}".
CAMERA_DISPLAY_NAMES: dict[int, str] = {
    0: "Front left camera",
    1: "Front camera",
    2: "Front right camera",
    3: "Rear left camera",
    4: "Rear camera",
    5: "Rear right camera",
    6: "Front telephoto camera",
}
LAYOUT_OF_MODE = {"teacher": "sft", "rollout": "chain-of-causation", "given-cot": "chain-of-causation"}


def camera_display_name(index: int) -> str:
    return CAMERA_DISPLAY_NAMES.get(int(index), f"Camera {int(index)}")


def check_nav_text(nav_text: str | None) -> str | None:
    """None (no route) or a non-empty plain string; special-token text would change the token layout."""
    if nav_text is None:
        return None
    if not isinstance(nav_text, str) or not nav_text.strip():
        raise ValueError(f"nav_text must be a non-empty string or None, got {nav_text!r}")
    if P._TOKEN_STRING.search(nav_text):
        raise ValueError(f"nav_text must not contain special-token or <iN> strings: {nav_text!r}")
    return nav_text


def image_content(camera_indices, frames_per_camera: int = FRAMES_PER_CAMERA) -> list[dict]:
    """User-message items for the images: camera label once, "frame k " before every image."""
    items: list[dict] = []
    for cam in camera_indices:
        items.append({"type": "text", "text": f"{camera_display_name(cam)}: "})
        for k in range(frames_per_camera):
            items += [{"type": "text", "text": f"frame {k} "}, {"type": "image"}]
    return items


def build_messages15(camera_indices, mode: str, *, nav_text: str | None = None, cot: str | None = None,
                     frames_per_camera: int = FRAMES_PER_CAMERA) -> list[dict]:
    """The 1.5 [system, user, assistant] messages; `camera_indices` already ascending."""
    nav_text = check_nav_text(nav_text)
    messages = P.build_messages(len(camera_indices) * frames_per_camera, mode, cot)  # validates mode / cot
    user = messages[1]["content"]
    instruction = user[-1]["text"][len(P.HISTORY_BLOCK):]
    route = f"<|route_start|>{nav_text}<|route_end|>" if nav_text is not None else ""
    user[:] = image_content(camera_indices, frames_per_camera) + [
        {"type": "text", "text": P.HISTORY_BLOCK + route + instruction}
    ]
    return messages


def sorted_cameras(sample: Sample) -> tuple[np.ndarray, torch.Tensor]:
    """(camera ids ascending (n_cam,), images (n_cam, n_frames, 3, H, W) in that order), stable sort."""
    idx = np.asarray(sample.camera_indices, dtype=np.int64).reshape(-1)
    images = torch.as_tensor(sample.images)
    if images.ndim != 5 or images.dtype != torch.uint8 or images.shape[0] != idx.shape[0]:
        raise ValueError(f"sample.images must be (n_cam={idx.shape[0]}, n_frames, 3, H, W) uint8, "
                         f"got {tuple(images.shape)} {images.dtype}")
    if len(set(idx.tolist())) != len(idx) or len(idx) == 0:
        raise ValueError(f"camera_indices must be distinct and non-empty, got {idx.tolist()}")
    order = np.argsort(idx, kind="stable")
    return idx[order], images[torch.from_numpy(order)]


def route_span(input_ids: torch.Tensor, ids: dict) -> tuple[int, int] | None:
    """[r_s, r_e] (inclusive) of the first `<|route_start|>` .. first `<|route_end|>`, or None."""
    seq = torch.as_tensor(input_ids).reshape(-1)
    starts = (seq == ids["route_start"]).nonzero().flatten()
    ends = (seq == ids["route_end"]).nonzero().flatten()
    if len(starts) == 0 and len(ends) == 0:
        return None
    if len(starts) == 0 or len(ends) == 0 or int(ends[0]) < int(starts[0]):
        raise ValueError("route tokens are unbalanced: need <|route_start|> before <|route_end|>")
    return int(starts[0]), int(ends[0])


def remove_route(input_ids: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """(1, T) ids -> (1, T - (r_e - r_s + 1)): the unguided prompt (nav_utils.remove_nav_text)."""
    r_s, r_e = span
    return torch.cat([input_ids[:, :r_s], input_ids[:, r_e + 1:]], dim=1)


def build_vlm_inputs15(processor, sample: Sample, *, mode: str, nav_text: str | None = None,
                       cot: str | None = None, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                       pixels: str = "inference") -> dict:
    """shared.prompt.build_vlm_inputs' dict for the 1.5 layout (`pixels` as there), plus

    camera_ids (n_cam,) int64 ascending, nav_text (str | None) and route_span ((r_s, r_e) | None).
    """
    if mode == "given-cot" and cot is None:
        cot = sample.cot
    cams, images = sorted_cameras(sample)
    messages = build_messages15(cams.tolist(), mode, nav_text=nav_text, cot=cot, frames_per_camera=images.shape[1])
    out = P.inputs_from_messages(processor, messages, images, sample.ego_history_xyz, with_prefix=mode != "rollout",
                                 min_pixels=min_pixels, max_pixels=max_pixels, pixels=pixels)
    out["camera_ids"] = torch.from_numpy(cams)
    out["nav_text"] = nav_text
    out["route_span"] = route_span(out["input_ids"], alpamayo_token_ids(processor.tokenizer))
    return out


def prompt_provenance(mode: str, frames_per_camera: int = FRAMES_PER_CAMERA) -> dict:
    """What a store records about the 1.5 prompt it was built with."""
    if mode not in LAYOUT_OF_MODE:
        raise ValueError(f"mode must be one of {tuple(LAYOUT_OF_MODE)}, got {mode!r}")
    return {"format": PROMPT_FORMAT, "mode": mode, "layout": LAYOUT_OF_MODE[mode], "camera_labels": True,
            "frame_labels": True, "frames_per_camera": frames_per_camera, "route_position": "after_history"}
