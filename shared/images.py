"""Qwen3-VL still-image preprocessing, exactly as Alpamayo-R1's release runs it, on either of its paths.

PIXEL_PATHS: "inference" (the default; what release inference and the vLLM RL rollout feed, and what
a fine-tuned head meets at inference) and "stage2" (the official SFT / Stage-2 data code,
processor/qwen_processor.py:271-279: frames as float x / 255 with do_rescale=False, so torchvision
resizes in float32 with no rounding or clamp, bicubic overshoot kept, then (y - 0.5) / 0.5). The two
differ by up to a few hundredths in `pixel_values` on almost every value. Inference path details:

The release passes the uint8 frames to `Qwen2VLImageProcessorFast` on CPU: torchvision's bicubic
antialiased resize on the uint8 tensor, then `(x - 127.5) / 127.5`, then the patch flattening below
(docs/alpamayo-r1-prompt.md §4). Reimplemented here in plain torch so that the cache is bitwise the
same with or without torchvision installed:

- On CPU, torchvision's `resize` hands a uint8 tensor straight to `torch.nn.functional.interpolate`
  for BICUBIC (`_do_native_uint8_resize_on_cpu`), which runs torch's native uint8 antialias kernel
  (fixed-point weights, Pillow-style a = -0.5 filter). Casting to float, interpolating and rounding
  instead differs by 1 LSB on ~10 % of noise pixels, so we call the uint8 kernel, always on CPU.
- Transformers' PIL backend (used when torchvision is absent) differs by up to 1 LSB on a small
  fraction of pixels: we never use it for the cache.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2  # a still image is repeated to fill the temporal patch
MERGE_SIZE = 2  # 2x2 patches merge into one LLM token
FACTOR = PATCH_SIZE * MERGE_SIZE  # resized sides are multiples of 32
MIN_PIXELS = 163_840  # release values (alpamayo helper.py; RL yaml)
MAX_PIXELS = 196_608
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1536
PIXEL_PATHS = ("inference", "stage2")


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen's target size: sides multiples of `factor`, area inside [min, max], aspect kept.

    Uses Python's banker's `round` like the original, so 1080x1920 -> 320x576, 1208x1920 -> 320x544.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds Qwen's limit of 200"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_uint8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic antialiased resize of uint8 frames (N, 3, H, W) -> (N, 3, h, w) uint8, on CPU.

    Same kernel torchvision uses for CPU uint8 BICUBIC; an unchanged size is returned as is (torchvision
    does the same). GPU tensors are moved to CPU because CUDA has no uint8 kernel and the float
    fallback rounds differently from what the release computed.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"expected (N, 3, H, W) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
    frames = frames.cpu()
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(
        frames.contiguous(), size=list(size), mode="bicubic", align_corners=False, antialias=True
    )


def stage2_pixels(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The Stage-2 training path: uint8 (N, 3, H, W) -> x / 255 in fp32 -> bicubic antialiased float resize
    (torchvision's float path is this interpolate call; no clamp) -> (y - 0.5) / 0.5, float32 (N, 3, h, w)."""
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(f"expected (N, 3, H, W) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
    x = frames.cpu().to(torch.float32) / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.contiguous(), size=list(size), mode="bicubic", align_corners=False, antialias=True)
    return (x - 0.5) / 0.5


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> float32 (x - 127.5) / 127.5: Qwen's mean = std = 0.5 fused with 1/255."""
    return (frames.to(torch.float32) - 127.5) / 127.5


def patchify(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) float32 -> (N * h/16 * w/16, 1536): Qwen2-VL's flat patch layout.

    Rows go by 2x2 merge block in raster order, then the block's 4 patches in raster order; each row
    is channel-major, then the 2 temporal copies of the still image, then the 16x16 pixels row-major.
    """
    n, c, h, w = pixels.shape
    gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
    if gh * PATCH_SIZE != h or gw * PATCH_SIZE != w or gh % MERGE_SIZE or gw % MERGE_SIZE:
        raise ValueError(f"image side {h}x{w} is not a multiple of {FACTOR}")
    x = pixels.reshape(
        n, c, gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE
    )
    # -> (n, gh/2, gw/2, mh, mw, c, ph, pw)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)
    # insert the temporal axis after the channel: (n, gh/2, gw/2, mh, mw, c, t, ph, pw)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, TEMPORAL_PATCH_SIZE, -1, -1)
    return x.reshape(n * gh * gw, c * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE)


def preprocess_images(
    frames_uint8: torch.Tensor | np.ndarray, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
    pixels: str = "inference",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Release image preprocessing for N still images of one size, on the `pixels` path (PIXEL_PATHS).

    frames_uint8: (N, 3, H, W) uint8. Returns pixel_values (N * h/16 * w/16, 1536) float32 and
    image_grid_thw (N, 3) int64 with rows [1, h/16, w/16]. Each image gives grid.prod() // 4 LLM tokens.
    """
    if pixels not in PIXEL_PATHS:
        raise ValueError(f"pixels={pixels!r}: use one of {', '.join(PIXEL_PATHS)}")
    frames = torch.as_tensor(frames_uint8)
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) frames, got {tuple(frames.shape)}")
    h, w = smart_resize(
        int(frames.shape[-2]), int(frames.shape[-1]), min_pixels=min_pixels, max_pixels=max_pixels
    )
    if pixels == "inference":
        pixel_values = patchify(normalize(resize_uint8(frames, (h, w))))  # (N * gh * gw, 1536)
    else:
        pixel_values = patchify(stage2_pixels(frames, (h, w)))
    grid = torch.tensor(
        [[1, h // PATCH_SIZE, w // PATCH_SIZE]] * frames.shape[0], dtype=torch.int64
    )  # (N, 3)
    return pixel_values, grid


def num_image_tokens(grid_thw: torch.Tensor) -> list[int]:
    """LLM tokens per image (180 for a 320x576 image): grid.prod() // merge_size**2."""
    return [int(g.prod()) // MERGE_SIZE**2 for g in grid_thw]
