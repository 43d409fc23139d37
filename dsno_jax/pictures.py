"""Pictures people look at: sample grids, trajectory strips and metric-versus-NFE plots (PNG)."""
import math
import os
from typing import Dict

import numpy as np


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255] (rounded, clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, cols: int = 0) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] or uint8 -> uint8 (rows*H, cols*W, C), row-major, nearly square."""
  images = np.asarray(images)
  pixels = images if images.dtype == np.uint8 else to_uint8(images)
  n, h, w, c = pixels.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.zeros((rows * cols, h, w, c), np.uint8)
  grid[:n] = pixels
  return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(pixels: np.ndarray, path: str, scale: int = 1) -> str:
  """Writes uint8 (H, W, C) as PNG, each pixel repeated `scale` times (small images)."""
  from PIL import Image
  if scale > 1:
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)
  return path


def trajectory_strips(noise, outputs) -> np.ndarray:
  """One row per example: the noise, then its K outputs from high to low noise.

  noise (n, H, W, C), outputs (n, K, H, W, C) in [-1, 1] -> uint8 (n*H, (K+1)*W, C).
  """
  noise = np.clip(np.asarray(noise) / 3.0, -1.0, 1.0)  # N(0, 1) shown at +-3 sigma
  frames = np.concatenate([noise[:, None], np.asarray(outputs)], axis=1)
  n, k1 = frames.shape[:2]
  return image_grid(frames.reshape((n * k1,) + frames.shape[2:]), cols=k1)


def plot_metric_vs_nfe(curves: Dict[str, Dict[int, float]], path: str, *, metric: str,
                       points: Dict[str, float] = None, title: str = "") -> str:
  """Log-log plot: one line per solver ({nfe: value}), plus single points (e.g. DSNO at 1 NFE)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, curve in curves.items():
    nfes = sorted(curve)
    ax.plot(nfes, [curve[n] for n in nfes], marker="o", label=name)
  for name, value in (points or {}).items():
    ax.scatter([1], [value], marker="*", s=160, zorder=3, label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("network evaluations (NFE)")
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path

