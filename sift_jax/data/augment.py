"""Image transforms on uint8 arrays, driven by random draws made beforehand.

The draws are made by the caller for the whole global batch (so they depend only on (seed, step))
and sliced to the host's rows; the transforms here are deterministic functions of images + draws.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RRC_ATTEMPTS = 10


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: float) -> np.ndarray:
  """(images / scale - mean) / std per channel, as float32."""
  x = images.astype(np.float32) / np.float32(scale)  # (N, H, W, C)
  return (x - mean.astype(np.float32)) / std.astype(np.float32)


def crop_flip_draws(rng: np.random.Generator, n: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Crop offsets in [0, 2*pad] (n, 2) and flip flags (n,) for `pad_crop_flip`."""
  return rng.integers(0, 2 * pad + 1, size=(n, 2)), rng.random(n) < 0.5


def pad_crop_flip(
  images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
  """Zero-pads by `pad`, takes the HxW window at `offsets` (row, col), mirrors where `flips`.

  One gather for the whole batch: window row/column indices per image, reversed columns when
  flipped.
  """
  n, h, w, _ = images.shape
  padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])  # (N, H+2p, W+2p, C)
  rows = offsets[:, :1] + np.arange(h)  # (N, H)
  cols = offsets[:, 1:] + np.arange(w)  # (N, W)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)


def random_resized_crop_draws(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Uniforms (n, RRC_ATTEMPTS, 4) for `random_resized_crop_box` and flip flags (n,)."""
  return rng.random((n, RRC_ATTEMPTS, 4)), rng.random(n) < 0.5


def random_resized_crop_box(
  height: int,
  width: int,
  uniforms: np.ndarray,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """(top, left, h, w) of an Inception-style crop: area fraction in `scale`, aspect ratio
  log-uniform in `ratio`; the first of the attempts in `uniforms` (A, 4) that fits wins, else the
  centred crop of the largest box with a ratio in range (torchvision's rule)."""
  area = height * width
  target = area * (scale[0] + uniforms[:, 0] * (scale[1] - scale[0]))  # (A,)
  log_r = np.log(ratio[0]) + uniforms[:, 1] * (np.log(ratio[1]) - np.log(ratio[0]))
  r = np.exp(log_r)
  ws = np.round(np.sqrt(target * r)).astype(int)
  hs = np.round(np.sqrt(target / r)).astype(int)
  fits = (ws > 0) & (hs > 0) & (ws <= width) & (hs <= height)
  if fits.any():
    a = int(np.argmax(fits))
    top = int(uniforms[a, 2] * (height - hs[a] + 1))
    left = int(uniforms[a, 3] * (width - ws[a] + 1))
    return top, left, int(hs[a]), int(ws[a])
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of one uint8 (H, W, C) image (PIL, antialiased when shrinking)."""
  if image.shape[:2] == (height, width):
    return image
  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((width, height), Image.BILINEAR))
  return out[..., None] if squeeze else out


def random_resized_crop_flip(
  image: np.ndarray, uniforms: np.ndarray, flip: bool, size: int
) -> np.ndarray:
  """One training image: random resized crop to size x size, then a mirror when `flip`."""
  top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], uniforms)
  out = resize(image[top : top + h, left : left + w], size, size)
  return out[:, ::-1] if flip else out


def resize_center_crop(image: np.ndarray, resize_to: int, size: int) -> np.ndarray:
  """One eval image: shorter side resized to `resize_to`, then the centred size x size crop."""
  h, w = image.shape[:2]
  if h <= w:
    nh, nw = resize_to, max(size, int(round(w * resize_to / h)))
  else:
    nh, nw = max(size, int(round(h * resize_to / w))), resize_to
  out = resize(image, nh, nw)
  top, left = (nh - size) // 2, (nw - size) // 2
  return out[top : top + size, left : left + size]
