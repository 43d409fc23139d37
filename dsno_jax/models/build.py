"""Builds teacher and student from a config, and copies teacher parameters into the student."""
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import diffusion
from dsno_jax.models import conv, time_conv
from dsno_jax.models.unet import DSNO, UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def _unet_fields(config) -> Dict[str, Any]:
  m = config.model
  return dict(
      ch=m.ch, emb_ch=m.emb_ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), num_heads=m.num_heads, head_dim=m.head_dim,
      dropout=m.dropout, logsnr_input_type=m.logsnr_input_type,
      resblock_resample=m.resblock_resample, num_classes=config.data.num_classes,
      image_size=config.data.image_size, dtype=_dtype(m.dtype), remat=m.remat,
      conv_impl=conv.resolve_impl(m.conv_impl), fused_norm=m.fused_norm,
      time_conv_impl=time_conv.resolve_impl(m.time_conv_impl))


def teacher_from_config(config) -> UNet:
  """The teacher UNet; 2C output channels for a `both` teacher."""
  out_ch = diffusion.out_channels(config.teacher.mean_type, config.data.channels)
  return UNet(out_ch=out_ch, **_unet_fields(config))


def student_from_config(config) -> DSNO:
  """The DSNO student: x-hat at the K save times of the trajectory config."""
  return DSNO(out_ch=config.data.channels, num_modes=config.model.num_modes,
              num_times=len(config.trajectory.save_times), **_unet_fields(config))


def dummy_inputs(config, batch: int = 1):
  """Zero inputs of the config's shapes: (image (B,H,W,C), labels (B,) or None)."""
  s, c = config.data.image_size, config.data.channels
  x = jnp.zeros((batch, s, s, c), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32) if config.data.num_classes > 1 else None
  return x, y


def init_teacher(config, rng) -> Dict:
  """Fresh teacher parameters (float32)."""
  x, y = dummy_inputs(config)
  model = teacher_from_config(config)
  init = jax.jit(lambda r: model.init(r, x, jnp.zeros((1,)), y, train=False)["params"])
  return init(rng)


def init_student(config, rng) -> Dict:
  """Fresh student parameters (float32); TimeConvs at their random init."""
  x, y = dummy_inputs(config)
  k = len(config.trajectory.save_times)
  model = student_from_config(config)
  init = jax.jit(lambda r: model.init(r, x, jnp.zeros((k,)), y, train=False)["params"])
  return init(rng)


def param_shapes(init_fn, config) -> Dict:
  """Shapes/dtypes of the parameters, without allocating them."""
  return jax.eval_shape(lambda: init_fn(config, jax.random.PRNGKey(0)))


def is_time_conv_path(path) -> bool:
  return any(str(p).split(".")[-1].startswith("time_conv") for p in path)


def student_params_from_teacher(teacher_params, student_params, teacher_mean_type: str,
                                channels: Optional[int] = None):
  """Student tree with every teacher parameter copied in; TimeConvs keep their values.

  For a `both` teacher, `conv_out` keeps the x half of its output channels.
  Raises ValueError listing every mismatch (never a partial copy).
  """
  teacher = flax.traverse_util.flatten_dict(flax.core.unfreeze(teacher_params))
  student = flax.traverse_util.flatten_dict(flax.core.unfreeze(student_params))
  out = dict(student)
  missing, wrong = [], []
  for path, value in teacher.items():
    if path not in student:
      missing.append("/".join(path))
      continue
    value = jnp.asarray(value)
    if path[0] == "conv_out" and teacher_mean_type == "both":
      c = channels if channels is not None else value.shape[-1] // 2
      value = value[..., :c]
    if value.shape != student[path].shape:
      wrong.append(f"{'/'.join(path)}: teacher {value.shape} vs student {student[path].shape}")
      continue
    out[path] = value.astype(student[path].dtype)
  extra = [p for p in student if p not in teacher and not is_time_conv_path(p)]
  if missing or wrong or extra:
    raise ValueError(
        "teacher parameters do not fit the student:\n"
        f"  not in the student: {missing}\n  wrongly shaped: {wrong}\n"
        f"  student entries the teacher lacks (other than TimeConvs): "
        f"{['/'.join(p) for p in extra]}")
  return flax.traverse_util.unflatten_dict(out)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
