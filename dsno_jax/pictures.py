"""Pictures people look at: sample grids (a row per class when labelled), labelled trajectory
strips, metric-versus-NFE and memorisation plots (PNG)."""
import io
import math
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from dsno_jax import storage


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 in [0, 255] (rounded, clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


GAP_VALUE = 128  # mid-grey between cells: apart from both black backgrounds and white strokes


def image_grid(images, cols: int = 0, gap: int = 1) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] or uint8 -> uint8 grid, row-major, nearly square, with `gap`
  pixels of GAP_VALUE between cells (none around the edge), so neighbours never merge.

  The grid is (rows*H + (rows-1)*gap, cols*W + (cols-1)*gap, C).
  """
  images = np.asarray(images)
  pixels = images if images.dtype == np.uint8 else to_uint8(images)
  n, h, w, c = pixels.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, c), GAP_VALUE, np.uint8)
  for i in range(n):
    top, left = (i // cols) * (h + gap), (i % cols) * (w + gap)
    grid[top:top + h, left:left + w] = pixels[i]
  return grid


CLASS_ROWS = 10  # classes (rows) in a grid by class: the first ones, 0..CLASS_ROWS-1


def grid_labels(num_classes: int, per_class: int, max_classes: int = CLASS_ROWS) -> np.ndarray:
  """Labels of a grid by class: each of the classes 0..R-1, R = min(num_classes, max_classes),
  `per_class` times in a row; int32 (R * per_class,)."""
  if num_classes < 2 or per_class < 1:
    raise ValueError(f"num_classes={num_classes}, per_class={per_class}; expected a "
                     "class-conditional model (num_classes >= 2) and per_class >= 1")
  return np.repeat(np.arange(min(num_classes, max_classes), dtype=np.int32), per_class)


def class_grid(images, labels, gap: int = 1) -> Tuple[np.ndarray, np.ndarray]:
  """(uint8 grid, its row classes (R,)): one row per class present in `labels` (N,), in
  increasing order, each holding that class's images (N, H, W, C) in their order; short rows end
  in empty cells."""
  images, labels = np.asarray(images), np.asarray(labels)
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels of shape {labels.shape} for {images.shape[0]} images; expected "
                     f"({images.shape[0]},)")
  classes, counts = np.unique(labels, return_counts=True)
  rows = [image_grid(images[labels == c], cols=int(counts.max()), gap=gap) for c in classes]
  between = np.full((gap,) + rows[0].shape[1:], GAP_VALUE, np.uint8)
  stacked = [part for row in rows for part in (row, between)][:-1]
  return np.concatenate(stacked), classes


def save_png(pixels: np.ndarray, path: str, scale: int = 1) -> str:
  """Writes uint8 (H, W, C) as PNG, each pixel repeated `scale` times (small images)."""
  from PIL import Image
  if scale > 1:
    pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())
  return path


def trajectory_strips(noise, outputs, gap: int = 1) -> np.ndarray:
  """One row per example: the noise, then its K outputs from high to low noise.

  noise (n, H, W, C), outputs (n, K, H, W, C) in [-1, 1] -> the uint8 `image_grid` of the
  n x (K+1) frames.
  """
  noise = np.clip(np.asarray(noise) / 3.0, -1.0, 1.0)  # N(0, 1) shown at +-3 sigma
  frames = np.concatenate([noise[:, None], np.asarray(outputs)], axis=1)
  n, k1 = frames.shape[:2]
  return image_grid(frames.reshape((n * k1,) + frames.shape[2:]), cols=k1, gap=gap)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _show(ax, pixels):
  """uint8 (H, W, C) on a matplotlib axis, grey levels for C = 1, pixels kept square."""
  if pixels.shape[-1] == 1:
    ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  else:
    ax.imshow(pixels, interpolation="nearest")


def _labelled_cells(ax, grid, cell: int, labels: Sequence[str], axis: str):
  """`grid` (cells of `cell` pixels, 1-pixel gaps) on `ax`, `labels` at the centres of its
  first cells along `axis` ("x": columns, "y": rows), no ticks along the other."""
  _show(ax, grid)
  centres = [(cell + 1) * i + (cell - 1) / 2 for i in range(len(labels))]
  labelled, other = (ax.xaxis, ax.yaxis) if axis == "x" else (ax.yaxis, ax.xaxis)
  labelled.set_ticks(centres)
  labelled.set_ticklabels(labels, fontsize=8)
  other.set_ticks([])
  ax.tick_params(length=0)


def _save(fig, path: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
  _pyplot().close(fig)
  storage.write_bytes(path, buffer.getvalue())
  return path


def plot_trajectories(noise, outputs, save_times: Sequence[float], path: str,
                      logsnrs: Optional[Sequence[float]] = None, title: str = "") -> str:
  """`trajectory_strips` as a PNG whose columns are labelled with their t (and log-SNR).

  save_times (K,) and logsnrs (K,) are those of the K outputs; the first column is the noise
  (t = 1).
  """
  plt = _pyplot()
  strips = trajectory_strips(noise, outputs)
  n, k = np.shape(outputs)[:2]
  if len(save_times) != k:
    raise ValueError(f"{len(save_times)} save times for {k} outputs per example")
  h, w = np.shape(outputs)[2:4]
  labels = ["noise\nt=1"] + [f"t={t:g}" for t in save_times]
  if logsnrs is not None:
    labels = [labels[0]] + [f"{a}\nlog-SNR {lam:.1f}" for a, lam in zip(labels[1:], logsnrs)]
  fig, ax = plt.subplots(figsize=(1.0 + 1.1 * (k + 1), 0.6 + 1.1 * n))
  _labelled_cells(ax, strips, w, labels, "x")
  ax.xaxis.tick_top()
  if title:
    ax.set_xlabel(title, fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_class_grid(images, labels, path: str, title: str = "") -> str:
  """`class_grid` as a PNG whose rows are labelled with their class."""
  plt = _pyplot()
  grid, classes = class_grid(images, labels)
  h = np.shape(images)[1]
  rows, cols = grid.shape[0] / (h + 1), grid.shape[1] / (np.shape(images)[2] + 1)
  fig, ax = plt.subplots(figsize=(1.2 + 0.55 * cols, 0.5 + 0.55 * rows))
  _labelled_cells(ax, grid, h, [f"class {c}" for c in classes], "y")
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return _save(fig, path)


def plot_memorization(distances: Dict[str, np.ndarray],
                      pairs: Dict[str, Tuple[np.ndarray, np.ndarray]], path: str, *,
                      feature_name: str, title: str = "") -> str:
  """Histograms of nearest-training-image distances (one per set, e.g. samples and held-out
  test images) beside each model's closest pairs: a row per pair, the sample then its nearest
  training image. pairs {model: (uint8 (P, 2, H, W, C), distances (P,))}."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 1 + len(pairs), figsize=(5.5 + 2 * len(pairs), 4),
                           gridspec_kw={"width_ratios": [3] + [2] * len(pairs)}, squeeze=False)
  hist = axes[0, 0]
  values = [np.asarray(v) for v in distances.values()]
  bins = np.linspace(0.0, max(float(v.max()) for v in values) * 1.02, 40)
  for name, value in zip(distances, values):
    hist.hist(value, bins=bins, density=True, histtype="step", lw=1.5,
              label=f"{name} (median {np.median(value):.3g})")
  hist.set_xlabel(f"distance to the nearest training image ({feature_name})")
  hist.set_ylabel("density")
  hist.legend(fontsize=8)
  for grid, (model, (model_pairs, pair_distances)) in zip(axes[0, 1:], pairs.items()):
    model_pairs = np.asarray(model_pairs)
    p, _, h, w = model_pairs.shape[:4]
    _show(grid, image_grid(model_pairs.reshape((2 * p,) + model_pairs.shape[2:]), cols=2))
    grid.set_yticks([(h + 1) * i + (h - 1) / 2 for i in range(p)])
    grid.set_yticklabels([f"{d:.3g}" for d in np.asarray(pair_distances)], fontsize=7)
    grid.set_xticks([(w - 1) / 2, w + 1 + (w - 1) / 2])
    grid.set_xticklabels(["sample", "train"], fontsize=7)
    grid.tick_params(length=0)
    grid.set_ylabel("distance", fontsize=8)
    grid.set_title(f"{model}: closest pairs", fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)


def plot_metric_vs_nfe(curves: Dict[str, Dict[float, float]], path: str, *, metric: str,
                       points: Dict[str, Tuple[float, float]] = None, title: str = "") -> str:
  """Log-log plot: one line per solver ({nfe: value}), plus single points {name: (nfe, value)}
  (e.g. DSNO at 1 NFE, an adaptive solve at its mean NFE)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name, curve in curves.items():
    nfes = sorted(curve)
    ax.plot(nfes, [curve[n] for n in nfes], marker="o", label=name)
  for (name, (nfe, value)), marker in zip((points or {}).items(), "*Dsp^v"):
    ax.scatter([nfe], [value], marker=marker, s=160 if marker == "*" else 60, zorder=3,
               label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("network evaluations per sample (NFE)")
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)
