"""The configured teacher: a UNet (Progressive Distillation checkpoint or export) or a mixture."""
import dataclasses
import hashlib
from typing import Any, Callable, Dict, Optional, Tuple

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from dsno_jax import diffusion, models, storage, trees
from dsno_jax.models import build
from dsno_jax.models import io as model_io
from dsno_jax.teachers import exact
from dsno_jax.workdir import Workdir, resolve

TEACHER_KINDS = ("unet", "digits_mixture")  # config.teacher.kind
# Fields that change what a teacher computes without changing its parameter shapes.
_TEACHER_FUNCTION_FIELDS = ("teacher.mean_type", "model.logsnr_input_type", "data.image_size",
                            "data.channels", "data.num_classes")


def load_teacher(config, workdir: str) -> Tuple[Callable, str]:
  """(denoise(z (B,H,W,C), logsnr (B,), y) -> x_hat, identity string) of the configured teacher.

  Source, first that applies: `config.teacher.checkpoint` (a Progressive Distillation msgpack
  file, or a directory written by `save_model`); `config.teacher.kind == "digits_mixture"`
  (the exact Gaussian-mixture teacher); `WORKDIR/teacher` (written by train_teacher).
  `denoise` is a `jax.tree_util.Partial`: a pytree whose leaves are the parameters, so it can
  be passed through `jax.jit` as an argument instead of being baked in as constants.
  """
  _check_kind(config)
  if not config.teacher.checkpoint and config.teacher.kind == "digits_mixture":
    mixture = exact.digits_mixture(config.data.image_size)
    if mixture.means.shape[1:] != (config.data.image_size,) * 2 + (config.data.channels,):
      raise ValueError(f"the digits mixture has images {mixture.means.shape[1:]}; config.data "
                       f"asks for {config.data.image_size}x{config.data.image_size}x"
                       f"{config.data.channels}")
    denoise = jax.tree_util.Partial(type(mixture).denoise, mixture)
    return denoise, f"digits_mixture:image_size={config.data.image_size}"
  params, identity = load_teacher_params(config, workdir)
  if build.teacher_dtype(config) != jax.numpy.float32:  # float32 keeps the identities it had
    identity += f":dtype={config.teacher.dtype}"
  return unet_teacher_denoiser(config, params), identity


def _check_kind(config):
  if config.teacher.kind not in TEACHER_KINDS:
    raise ValueError(f"config.teacher.kind={config.teacher.kind!r}; expected one of "
                     f"{TEACHER_KINDS}")


def load_teacher_params(config, workdir: str) -> Tuple[Dict, str]:
  """(UNet parameters as float32 numpy, identity) from config.teacher.checkpoint or WORKDIR/teacher.

  Checked against the teacher of `config` (see `check_teacher_params`). The identity is
  "unet:{pd_msgpack|dsno_jax_export}:mean_type=..:clip_x=..:params_sha256=<16 hex>".
  """
  _check_kind(config)
  if config.teacher.checkpoint:
    path = resolve(config.teacher.checkpoint)
    if storage.isdir(path):
      params, source = _params_from_export(path, config), "dsno_jax_export"
    elif storage.isfile(path):
      params, source = _params_from_pd_msgpack(path, config), "pd_msgpack"
    else:
      raise FileNotFoundError(missing_teacher(config, workdir))
  elif config.teacher.kind == "digits_mixture":
    raise ValueError("config.teacher.kind='digits_mixture' is an exact teacher with no UNet "
                     "parameters; set teacher.kind='unet' or teacher.checkpoint")
  else:
    path = Workdir(workdir).teacher_export
    if not storage.isdir(path):
      raise FileNotFoundError(missing_teacher(config, workdir))
    params, source = _params_from_export(path, config), "dsno_jax_export"
  # The identity names the content, not the path, so a moved checkpoint is the same teacher.
  identity = (f"unet:{source}:mean_type={config.teacher.mean_type}:clip_x="
              f"{bool(config.teacher.clip_x)}:params_sha256={params_digest(params)}")
  logging.info("teacher %s from %s", identity, path)
  return params, identity


def missing_teacher(config, workdir: str) -> Optional[str]:
  """Why the configured teacher cannot be read, saying what to do, or None; reads no weights."""
  if config.teacher.checkpoint:
    if storage.exists(resolve(config.teacher.checkpoint)):
      return None
    return (f"config.teacher.checkpoint={config.teacher.checkpoint!r} does not exist; expected a "
            "Progressive Distillation msgpack file or a directory written by save_model "
            "(dsno_jax.models.io)")
  path = Workdir(workdir).teacher_export
  if config.teacher.kind == "digits_mixture" or storage.isdir(path):
    return None
  return (f"no teacher: {path} does not exist. Run --mode=train_teacher first, or set "
          "config.teacher.checkpoint (PD msgpack or save_model export) or "
          "config.teacher.kind='digits_mixture'")


@dataclasses.dataclass(frozen=True)
class _UNetDenoise:
  """denoise(params, z, logsnr, y) of a teacher UNet; hashable, so equal teachers share a jit."""
  model: Any
  mean_type: str
  clip_x: bool

  def __call__(self, params, z, logsnr, y=None):
    return diffusion.unet_denoiser(self.model, params, self.mean_type, self.clip_x)(z, logsnr, y)


def unet_teacher_denoiser(config, params) -> Callable:
  """The teacher UNet's x-hat denoiser as a pytree (`Partial`) over `params`, computing in
  config.teacher.dtype (not the student's model.dtype: a bfloat16 student keeps a float32
  teacher unless asked)."""
  model = models.teacher_from_config(config).clone(dtype=build.teacher_dtype(config))
  denoise = _UNetDenoise(model, config.teacher.mean_type, bool(config.teacher.clip_x))
  return jax.tree_util.Partial(denoise, jax.tree_util.tree_map(jax.numpy.asarray, params))


def params_digest(params) -> str:
  """SHA-256 (first 16 hex digits) of the parameter paths, shapes, dtypes and bytes."""
  digest = hashlib.sha256()
  for path, value in sorted(flax.traverse_util.flatten_dict(_to_dict(params)).items()):
    value = np.ascontiguousarray(value)
    digest.update(f"{'/'.join(path)}:{value.shape}:{value.dtype};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()[:16]


def _to_dict(tree):
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree


def check_teacher_params(params, config, *, allow_reshape: bool = False) -> Dict:
  """`params` as float32 numpy arrays, checked against the teacher of `config`.

  Every path and shape must match `models.param_shapes(models.init_teacher, config)`; one
  ValueError lists all missing, unexpected and wrongly shaped entries. With `allow_reshape`
  (Progressive Distillation checkpoints, whose older flax versions stored some kernels with
  merged axes, as their own loader accounts for) an entry with the right number of elements
  is reshaped.
  """
  if not isinstance(params, dict):
    raise ValueError(f"teacher parameters are a {type(params).__name__}; expected a nested dict")
  expected = trees.shapes(models.param_shapes(models.init_teacher, config))
  given = {path: np.asarray(value) for path, value in trees.flatten(_to_dict(params)).items()}
  for path, value in given.items():
    if allow_reshape and path in expected and _merges_axes(value.shape, expected[path]):
      logging.info("teacher import: reshaped %s from %s to %s", path, value.shape, expected[path])
      given[path] = value.reshape(expected[path])
  mismatch = trees.compare(trees.shapes(given), expected)
  not_float = [f"{path}: dtype {value.dtype}, expected a float" for path, value in given.items()
               if not np.issubdtype(value.dtype, np.floating)]
  if mismatch or not_float:
    mismatch = mismatch._replace(wrong=mismatch.wrong + not_float)
    raise ValueError("teacher parameters do not fit the teacher of this config "
                     f"(models.teacher_from_config):\n{mismatch.describe()}")
  return trees.unflatten({path: value.astype(np.float32) for path, value in given.items()})


def _merges_axes(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
  """Whether one shape is the other with some adjacent axes merged (same C-order layout)."""
  if len(a) == len(b) or int(np.prod(a)) != int(np.prod(b)):
    return False
  fewer, more = sorted((tuple(a), tuple(b)), key=len)
  return set(np.cumprod(fewer).tolist()) <= set(np.cumprod(more).tolist())


def _params_from_export(path: str, config) -> Dict:
  try:
    meta = model_io.read_model_meta(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"{path}: expected a teacher directory written by save_model "
                     f"(dsno_jax.models.io) ({e})") from e
  if meta["role"] != "teacher":
    raise ValueError(f"{path} is a {meta['role']} export; expected role 'teacher'")
  saved = ml_collections.ConfigDict(meta["config"])
  differ = []
  for field in _TEACHER_FUNCTION_FIELDS:
    a, b = _get_field(saved, field), _get_field(config, field)
    if a != b:
      differ.append(f"{field}: saved {a!r}, config {b!r}")
  if differ:
    raise ValueError(f"the teacher in {path} was built with another config: {differ}")
  params, _, _ = model_io.load_model(path)
  return check_teacher_params(params, config)


def _get_field(config, dotted: str):
  for name in dotted.split("."):
    config = config.get(name) if config is not None else None
  return config


def _params_from_pd_msgpack(path: str, config) -> Dict:
  """The `ema_params` of a flax msgpack train state (never unpickles anything)."""
  data = storage.read_bytes(path)
  expected = ("expected a Progressive Distillation checkpoint: a flax msgpack "
              "(flax.serialization.to_bytes) train state with 'ema_params'")
  try:
    state = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several types for bytes that are not msgpack
    raise ValueError(f"{path} is not a flax msgpack file ({type(e).__name__}: {e}); "
                     f"{expected}") from None
  if not isinstance(state, dict) or "ema_params" not in state:
    keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
    raise ValueError(f"{path} is msgpack but holds {keys}, with no 'ema_params'; {expected}")
  return check_teacher_params(state["ema_params"], config, allow_reshape=True)
