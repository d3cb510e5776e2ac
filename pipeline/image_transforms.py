"""Image transforms with Pillow and torch only (no torchvision): decode, crop, flip, normalise.

* evaluation: resize the shorter side to ``resize`` (bilinear), center-crop ``size x size``;
* training (``data.augment``): RandomResizedCrop to ``size`` (area fraction ~ U(0.08, 1), log
  aspect ratio ~ U(log 3/4, log 4/3), up to 10 draws, else the center crop of the clamped
  ratio: torchvision's rule), then a horizontal flip with probability 1/2.

Randomness comes from a ``numpy.random.Generator`` passed in, which the streaming source seeds
per sample from ``(epoch seed, sample index)``, so augmentation does not depend on which worker
process decodes an image. Images stay ``uint8 (3, H, W)`` until :func:`normalise`.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10
DECODE_ERRORS = (OSError, SyntaxError, ValueError)  # Pillow's "cannot identify/truncated/broken"

__all__ = [
    "DECODE_ERRORS",
    "center_crop",
    "decode_rgb",
    "eval_image",
    "normalise",
    "random_resized_crop_box",
    "to_uint8_chw",
    "train_image",
]


def decode_rgb(data: bytes):
    """Decode encoded image bytes into an RGB ``PIL.Image`` (fully loaded; raises on damage)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise OSError("not an image format Pillow can identify") from None
    with im:
        im.load()  # decode now: truncated files fail here, not later
        return im.convert("RGB")


def center_crop(im, size: int, resize: int):
    """Shorter side to ``resize`` (each side >= ``size``), then the central ``size`` square."""
    from PIL import Image

    w, h = im.size
    scale = resize / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        im = im.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return im.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """``(left, top, crop_width, crop_height)`` of a RandomResizedCrop on a ``width x height``
    image: area ``s * W * H`` with ``s ~ U(RRC_SCALE)``, aspect ``exp(U(log RRC_RATIO))``."""
    area = width * height
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    for _ in range(RRC_ATTEMPTS):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    ratio = width / height  # fallback: the whole image, aspect clamped to RRC_RATIO
    if ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif ratio > RRC_RATIO[1]:
        w, h = round(height * RRC_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_image(im, size: int, rng: np.random.Generator):
    """RandomResizedCrop to ``size x size`` (bilinear) and a horizontal flip with p = 1/2."""
    from PIL import Image

    left, top, w, h = random_resized_crop_box(im.size[0], im.size[1], rng)
    out = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def eval_image(im, size: int, resize: int):
    """The evaluation transform: :func:`center_crop`."""
    return center_crop(im, size, resize)


def to_uint8_chw(im) -> torch.Tensor:
    """An RGB ``PIL.Image`` as a contiguous ``uint8 (3, H, W)`` tensor."""
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy())


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` in float32, per channel, on ``x``'s device (uint8 in)."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - m) / s
