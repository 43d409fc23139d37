"""Converts a DSNO-pytorch LMDB trajectory database into this project's trajectory dataset.

DSNO-pytorch (github.com/devzhk/DSNO-pytorch, utils/dataset.py) stores each trajectory under
the key "0", "1", ... as float32 bytes in C order of a configured shape (e.g. (C, T, H, W)),
with the count under the key "length"; `dims` permutes it to (T, C, H, W), `t_idx` keeps some
of the T stored times, the first kept one being the noise z_1. ImageNet-64 databases sit in
PATH/lmdb with the labels in PATH/labels.npy. Pixels are in [-1, 1].

  python -m dsno_jax.data.import_dsno_lmdb --src=PATH --dst=DIR --preset=cifar10
  python -m dsno_jax.data.import_dsno_lmdb --src=PATH --dst=DIR --shape=3,9,64,64 \
      --dims=1,0,2,3 --t_idx=0,2,4,6,8 --save_times=0.75,0.5,0.25,0 --labels=PATH/labels.npy

Shards already written are kept, so a killed import resumes; the noise is stored (no seed of
ours reproduces it).
"""
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence, Tuple

from absl import app, flags, logging
import numpy as np

from dsno_jax import diffusion
from dsno_jax.data import trajectories


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one database value is laid out, and the times its kept slices stand for."""
  shape: Tuple[int, ...]  # of each value, C order, e.g. (C, T, H, W)
  dims: Tuple[int, ...]  # permutation of `shape` to (T, C, H, W)
  t_idx: Tuple[int, ...]  # kept times along T; the first is the noise
  save_times: Tuple[float, ...]  # t in [0, 1] of the kept times after the noise
  labels: str = ""  # path of a labels .npy ("" for unconditional data)
  num_classes: int = 1

  def check(self):
    if sorted(self.dims) != list(range(len(self.shape))) or len(self.shape) != 4:
      raise ValueError(f"dims={self.dims} is not a permutation of the 4 axes of "
                       f"shape={self.shape}")
    num_times = self.shape[self.dims[0]]
    if not self.t_idx or not all(0 <= t < num_times for t in self.t_idx):
      raise ValueError(f"t_idx={self.t_idx}: expected indices in [0, {num_times})")
    if len(self.save_times) != len(self.t_idx) - 1:
      raise ValueError(f"{len(self.save_times)} save_times for t_idx={self.t_idx}: expected "
                       f"{len(self.t_idx) - 1} (one per kept time after the noise)")

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    _, c, h, w = (self.shape[d] for d in self.dims)
    return (h, w, c)

  def split(self, value: bytes, key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(noise (H, W, C), targets (K, H, W, C)) of one database value."""
    expected = int(np.prod(self.shape)) * 4
    if len(value) != expected:
      raise ValueError(f"value {key!r} holds {len(value)} bytes; shape {self.shape} of float32 "
                       f"needs {expected}: the database does not have this shape")
    frames = np.frombuffer(value, np.float32).reshape(self.shape).transpose(self.dims)
    kept = frames[list(self.t_idx)].transpose(0, 2, 3, 1)  # (T', H, W, C)
    return kept[0], kept[1:]


# DSNO-pytorch's two configs (configs/{cifar10,imagenet64}-dsno-t4.yaml); the save times follow
# from its `get_idx` on linspace(1, 0, num_steps + 1): quadratic for CIFAR-10, uniform for
# ImageNet-64.
PRESETS = {
    "cifar10": Layout(shape=(3, 17, 32, 32), dims=(1, 0, 2, 3), t_idx=(0, 4, 8, 12, 16),
                      save_times=(0.5625, 0.25, 0.0625, 0.0)),
    "imagenet64": Layout(shape=(3, 9, 64, 64), dims=(1, 0, 2, 3), t_idx=(0, 2, 4, 6, 8),
                         save_times=(0.75, 0.5, 0.25, 0.0), labels="labels.npy",
                         num_classes=1000),
}


def _database_dir(src: str, layout: Layout) -> str:
  """ImageNet-style folders keep the database in SRC/lmdb next to labels.npy."""
  nested = os.path.join(src, "lmdb")
  return nested if layout.labels and os.path.isdir(nested) else src


def _labels(src: str, layout: Layout, length: int) -> np.ndarray:
  if not layout.labels:
    return np.zeros(length, np.int32)
  path = layout.labels if os.path.isabs(layout.labels) else os.path.join(src, layout.labels)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"labels file {path} does not exist (--labels)")
  labels = np.load(path, allow_pickle=False).astype(np.int64).reshape(-1)
  if len(labels) < length:
    raise ValueError(f"{path} holds {len(labels)} labels for {length} trajectories")
  if labels.min() < 0 or labels.max() >= layout.num_classes:
    raise ValueError(f"labels in {path} span [{labels.min()}, {labels.max()}]; expected "
                     f"[0, {layout.num_classes})")
  return labels[:length].astype(np.int32)


def plan_for(layout: Layout, num_examples: int, shard_size: int, source: str,
             targets_dtype: str, logsnrs: Optional[Sequence[float]] = None,
             logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> dict:
  """The dataset's metadata: like a generated dataset's, with the noise stored."""
  times = np.asarray(layout.save_times, np.float64)
  if logsnrs is None:
    logsnrs = diffusion.logsnr_schedule_cosine(times, logsnr_min=logsnr_min,
                                               logsnr_max=logsnr_max)
  logsnrs = [float(v) for v in np.asarray(logsnrs, np.float32)]
  if len(logsnrs) != len(times):
    raise ValueError(f"{len(logsnrs)} log-SNRs for {len(times)} save times")
  return {
      "format": trajectories.FORMAT, "noise": "stored", "seed": 0,
      "num_examples": int(num_examples), "shard_size": int(shard_size),
      "image_shape": list(layout.image_shape), "num_classes": int(layout.num_classes),
      "num_times": len(times), "save_times": [float(t) for t in times], "logsnrs": logsnrs,
      "logsnr_min": float(logsnr_min), "logsnr_max": float(logsnr_max),
      "solver": "dsno_pytorch_lmdb", "grid": "", "num_steps": 0, "nfe": None,
      "target_nfe": len(times), "rtol": 0.0, "atol": 0.0, "targets_dtype": targets_dtype,
      "teacher": f"dsno_pytorch_lmdb:{os.path.basename(os.path.normpath(source))}:"
                 f"shape={list(layout.shape)}:dims={list(layout.dims)}:"
                 f"t_idx={list(layout.t_idx)}",
  }


def import_lmdb(src: str, dst: str, layout: Layout, *, shard_size: int = 10_000,
                targets_dtype: str = "float16", num_examples: int = 0,
                logsnrs: Optional[Sequence[float]] = None) -> str:
  """Writes (or finishes) the dataset at `dst` from the database at `src`; returns `dst`."""
  import lmdb  # only this importer needs it
  layout.check()
  directory = _database_dir(src, layout)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no LMDB database at {directory} (--src)")
  env = lmdb.open(directory, readonly=True, lock=False, readahead=False, meminit=False)
  try:
    with env.begin(write=False) as txn:
      raw_length = txn.get(b"length")
      if raw_length is None:
        raise ValueError(f"{directory} has no 'length' key: not a DSNO-pytorch trajectory "
                         "database")
      length = int(raw_length.decode("ascii"))
      if num_examples:
        if num_examples > length:
          raise ValueError(f"--num_examples={num_examples} but the database holds {length}")
        length = num_examples
      labels = _labels(src, layout, length)
      plan = plan_for(layout, length, shard_size, src, targets_dtype, logsnrs)
      if trajectories.prepare(dst, plan):
        logging.info("import: %s is already complete", dst)
        return dst
      total = trajectories.num_shards(length, shard_size)
      todo = sorted(set(range(total)) - trajectories.existing_shards(dst, plan))
      start = time.time()
      for done, shard in enumerate(todo, 1):
        indices = trajectories.shard_range(shard, length, shard_size)
        noise, targets = [], []
        for i in indices:
          value = txn.get(str(i).encode())
          if value is None:
            raise ValueError(f"{directory} has no key {str(i)!r} although 'length' is {length}")
          z, x = layout.split(bytes(value), str(i))
          noise.append(z)
          targets.append(x)
        trajectories.write_shard(dst, plan, shard, {
            "noise": np.stack(noise), "targets": np.stack(targets),
            "label": labels[indices.start:indices.stop], "index": np.asarray(indices)})
        elapsed = time.time() - start
        logging.info("import: shard %d/%d (%d of this run's %d), %.0f trajectories/s, ETA %.0f s",
                     shard + 1, total, done, len(todo), done * shard_size / max(elapsed, 1e-9),
                     elapsed / done * (len(todo) - done))
  finally:
    env.close()
  trajectories.finalize(dst, plan)
  logging.info("import: wrote %d trajectories to %s", length, dst)
  return dst


FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "The DSNO-pytorch database (folder with data.mdb, or its parent "
                    "holding lmdb/ and labels.npy).")
flags.DEFINE_string("dst", None, "Directory of the trajectory dataset to write.")
flags.DEFINE_enum("preset", None, sorted(PRESETS), "Layout of one of DSNO-pytorch's configs.")
flags.DEFINE_list("shape", None, "Value shape, e.g. 3,17,32,32 (overrides the preset).")
flags.DEFINE_list("dims", None, "Permutation to (T, C, H, W), e.g. 1,0,2,3.")
flags.DEFINE_list("t_idx", None, "Kept time indices, the noise first, e.g. 0,4,8,12,16.")
flags.DEFINE_list("save_times", None, "t of the kept times after the noise, e.g. 0.5625,0.25,"
                  "0.0625,0.")
flags.DEFINE_list("logsnrs", None, "Their log-SNRs (default: the cosine schedule of the times).")
flags.DEFINE_string("labels", None, "Labels .npy (absolute, or relative to --src).")
flags.DEFINE_integer("num_classes", None, "Number of classes of the labels.")
flags.DEFINE_integer("shard_size", 10_000, "Trajectories per shard.")
flags.DEFINE_integer("num_examples", 0, "Import only the first N (0: all).")
flags.DEFINE_enum("targets_dtype", "float16", sorted(trajectories.TARGETS_DTYPES),
                  "Storage of the targets.")


def layout_from_flags() -> Layout:
  base = PRESETS[FLAGS.preset] if FLAGS.preset else None
  fields = {}
  for name, parse in (("shape", int), ("dims", int), ("t_idx", int), ("save_times", float)):
    value = getattr(FLAGS, name)
    if value is not None:
      fields[name] = tuple(parse(v) for v in value)
    elif base is None:
      raise app.UsageError(f"--{name} is needed without --preset")
  if FLAGS.labels is not None:
    fields["labels"] = FLAGS.labels
  if FLAGS.num_classes is not None:
    fields["num_classes"] = FLAGS.num_classes
  elif FLAGS.labels and (base is None or not base.labels):
    raise app.UsageError("--labels needs --num_classes")
  return dataclasses.replace(base, **fields) if base else Layout(**fields)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.src or not FLAGS.dst:
    raise app.UsageError("--src and --dst are required")
  logsnrs = [float(v) for v in FLAGS.logsnrs] if FLAGS.logsnrs else None
  import_lmdb(FLAGS.src, FLAGS.dst, layout_from_flags(), shard_size=FLAGS.shard_size,
              targets_dtype=FLAGS.targets_dtype, num_examples=FLAGS.num_examples,
              logsnrs=logsnrs)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
