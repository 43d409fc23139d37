"""Model checkpoints: orbax exports (parameters + config) and the import of teachers."""
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Dict, Tuple

from absl import logging
import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dsno_jax import diffusion, models, teachers

ROLES = ("teacher", "student", "classifier")
TEACHER_KINDS = ("unet", "digits_mixture")  # config.teacher.kind
_META = "model.json"
_PARAMS = "params"


def save_model(path: str, params, config, role: str) -> str:
  """Writes `path/params` (orbax) and `path/model.json` (role + config); returns path.

  Written to a temporary sibling and renamed, so an existing export is never half-replaced.
  """
  if role not in ROLES:
    raise ValueError(f"role={role!r}; expected one of {ROLES}")
  path = os.path.abspath(path)
  tmp = path + ".tmp"
  if jax.process_index() == 0 and os.path.exists(tmp):
    import shutil
    shutil.rmtree(tmp)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, _PARAMS), jax.tree_util.tree_map(np.asarray, params))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(tmp, _META), "w") as f:
      json.dump({"format": "dsno_jax.model", "role": role, "config": json.loads(config.to_json())},
                f, indent=1)
    if os.path.exists(path):
      os.rename(path, path + ".old")
    os.rename(tmp, path)
    if os.path.exists(path + ".old"):
      import shutil
      shutil.rmtree(path + ".old")
  if jax.process_count() > 1:  # no process may read the export before process 0 renamed it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"save_model {path}")
  return path


def read_model_meta(path: str) -> Dict:
  meta_file = os.path.join(path, _META)
  if not os.path.isfile(meta_file):
    raise FileNotFoundError(f"{path} is not a dsno_jax model export: {meta_file} is missing")
  with open(meta_file) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{meta_file} is corrupt ({e}); expected the JSON that save_model writes")
  if meta.get("format") != "dsno_jax.model" or meta.get("role") not in ROLES:
    raise ValueError(f"{meta_file} is not a dsno_jax model export (format={meta.get('format')!r},"
                     f" role={meta.get('role')!r})")
  return meta


def load_model(path: str) -> Tuple[Dict, ml_collections.ConfigDict, str]:
  """(params as numpy arrays, the config that builds them, role) of a `save_model` export."""
  meta = read_model_meta(path)
  params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), _PARAMS))
  config = ml_collections.ConfigDict(meta["config"])
  return params, config, meta["role"]


# --- teacher import -----------------------------------------------------------------------
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
    mixture = teachers.digits_mixture(config.data.image_size)
    if mixture.means.shape[1:] != (config.data.image_size,) * 2 + (config.data.channels,):
      raise ValueError(f"the digits mixture has images {mixture.means.shape[1:]}; config.data "
                       f"asks for {config.data.image_size}x{config.data.image_size}x"
                       f"{config.data.channels}")
    denoise = jax.tree_util.Partial(type(mixture).denoise, mixture)
    return denoise, f"digits_mixture:image_size={config.data.image_size}"
  params, identity = load_teacher_params(config, workdir)
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
    path = os.path.abspath(config.teacher.checkpoint)
    if os.path.isdir(path):
      params, source = _params_from_export(path, config), "dsno_jax_export"
    elif os.path.isfile(path):
      params, source = _params_from_pd_msgpack(path, config), "pd_msgpack"
    else:
      raise FileNotFoundError(
          f"config.teacher.checkpoint={config.teacher.checkpoint!r} does not exist; expected a "
          "Progressive Distillation msgpack file or a directory written by save_model")
  elif config.teacher.kind == "digits_mixture":
    raise ValueError("config.teacher.kind='digits_mixture' is an exact teacher with no UNet "
                     "parameters; set teacher.kind='unet' or teacher.checkpoint")
  else:
    path = os.path.abspath(os.path.join(workdir, "teacher"))
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"no teacher: {path} does not exist. Run --mode=train_teacher first, or set "
          "config.teacher.checkpoint (PD msgpack or save_model export) or "
          "config.teacher.kind='digits_mixture'")
    params, source = _params_from_export(path, config), "dsno_jax_export"
  # The identity names the content, not the path, so a moved checkpoint is the same teacher.
  identity = (f"unet:{source}:mean_type={config.teacher.mean_type}:clip_x="
              f"{bool(config.teacher.clip_x)}:params_sha256={params_digest(params)}")
  logging.info("teacher %s from %s", identity, path)
  return params, identity


@dataclasses.dataclass(frozen=True)
class _UNetDenoise:
  """denoise(params, z, logsnr, y) of a teacher UNet; hashable, so equal teachers share a jit."""
  model: Any
  mean_type: str
  clip_x: bool

  def __call__(self, params, z, logsnr, y=None):
    return diffusion.unet_denoiser(self.model, params, self.mean_type, self.clip_x)(z, logsnr, y)


def unet_teacher_denoiser(config, params) -> Callable:
  """The teacher UNet's x-hat denoiser as a pytree (`Partial`) over `params`."""
  denoise = _UNetDenoise(models.teacher_from_config(config), config.teacher.mean_type,
                         bool(config.teacher.clip_x))
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
  expected = flax.traverse_util.flatten_dict(
      _to_dict(models.param_shapes(models.init_teacher, config)))
  if not isinstance(params, dict):
    raise ValueError(f"teacher parameters are a {type(params).__name__}; expected a nested dict")
  given = flax.traverse_util.flatten_dict(_to_dict(params))
  missing = sorted("/".join(p) for p in expected if p not in given)
  unexpected = sorted("/".join(p) for p in given if p not in expected)
  wrong, out = [], {}
  for path, spec in expected.items():
    if path not in given:
      continue
    value = np.asarray(given[path])
    if value.shape != spec.shape:
      if allow_reshape and _merges_axes(value.shape, spec.shape):
        logging.info("teacher import: reshaped %s from %s to %s", "/".join(path), value.shape,
                     spec.shape)
        value = value.reshape(spec.shape)
      else:
        wrong.append(f"{'/'.join(path)}: {value.shape}, expected {spec.shape}")
        continue
    if not np.issubdtype(value.dtype, np.floating):
      wrong.append(f"{'/'.join(path)}: dtype {value.dtype}, expected a float")
      continue
    out[path] = value.astype(np.float32)
  if missing or unexpected or wrong:
    raise ValueError(
        "teacher parameters do not fit the teacher of this config "
        f"(models.teacher_from_config):\n  missing: {missing}\n  unexpected: {unexpected}\n"
        f"  wrongly shaped: {wrong}")
  return flax.traverse_util.unflatten_dict(out)


def _merges_axes(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
  """Whether one shape is the other with some adjacent axes merged (same C-order layout)."""
  if len(a) == len(b) or int(np.prod(a)) != int(np.prod(b)):
    return False
  fewer, more = sorted((tuple(a), tuple(b)), key=len)
  return set(np.cumprod(fewer).tolist()) <= set(np.cumprod(more).tolist())


def _params_from_export(path: str, config) -> Dict:
  try:
    meta = read_model_meta(path)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"{path}: expected a teacher directory written by save_model ({e})") from e
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
  params, _, _ = load_model(path)
  return check_teacher_params(params, config)


def _get_field(config, dotted: str):
  for name in dotted.split("."):
    config = config.get(name) if config is not None else None
  return config


def _params_from_pd_msgpack(path: str, config) -> Dict:
  """The `ema_params` of a flax msgpack train state (never unpickles anything)."""
  with open(path, "rb") as f:
    data = f.read()
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
