"""Builds teacher and student from a config, and copies teacher parameters into the student."""
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dsno_jax import backend, diffusion, trees
from dsno_jax.errors import UserError
from dsno_jax.models.blocks import attention_heads, group_norm
from dsno_jax.models.unet import DSNO, UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def time_conv_formulation(name: str) -> str:
  """model.time_conv_impl resolved: "auto" is the backend's choice, "fft" | "dft" themselves."""
  choices = ("auto",) + backend.TIME_CONV_FORMULATIONS
  if name not in choices:
    raise ValueError(f"model.time_conv_impl={name!r}; expected one of {choices}")
  return backend.time_conv_formulation() if name == "auto" else name


def _unet_fields(config) -> Dict[str, Any]:
  model = config.model
  return dict(
      ch=model.ch, emb_ch=model.emb_ch, ch_mult=tuple(model.ch_mult),
      num_res_blocks=model.num_res_blocks, attn_resolutions=tuple(model.attn_resolutions),
      num_heads=model.num_heads, head_dim=model.head_dim, dropout=model.dropout,
      logsnr_input_type=model.logsnr_input_type, resblock_resample=model.resblock_resample,
      num_classes=config.data.num_classes, image_size=config.data.image_size,
      dtype=_dtype(model.dtype), remat=model.remat)


def teacher_dtype(config):
  """The teacher's compute dtype when it denoises (trajectories, teacher baselines, sample
  grids): config.teacher.dtype, independent of the student's model.dtype."""
  name = config.teacher.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"teacher.dtype={name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def check_model_config(config):
  """UserError naming the config field when the UNet of `config` cannot be built."""
  model, image_size = config.model, config.data.image_size
  for name in ("ch", "emb_ch"):
    if not isinstance(model[name], int) or model[name] < 1:
      raise UserError(f"model.{name}={model[name]!r}; expected a positive integer")
  ch_mult = tuple(model.ch_mult)
  if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
    raise UserError(f"model.ch_mult={ch_mult}; expected one or more positive integers (one "
                    "channel multiplier per resolution level)")
  if not isinstance(model.num_res_blocks, int) or model.num_res_blocks < 1:
    raise UserError(f"model.num_res_blocks={model.num_res_blocks!r}; expected a positive "
                    "integer (ResnetBlocks per level)")
  groups = group_norm("probe", jnp.float32).num_groups  # the one place that sets it
  if model.ch % groups:
    raise UserError(f"model.ch={model.ch}: the UNet's GroupNorms have {groups} groups, which "
                    f"must divide every channel count; use a multiple of {groups}")
  halvings = len(ch_mult) - 1
  if image_size % (2 ** halvings):
    raise UserError(f"data.image_size={image_size} cannot be halved {halvings} times "
                    f"(model.ch_mult={ch_mult} has {len(ch_mult)} levels); use a multiple of "
                    f"{2 ** halvings} or fewer levels")
  attended = {model.ch * ch_mult[-1]} | {model.ch * m for i, m in enumerate(ch_mult)
                                         if image_size // 2 ** i in tuple(model.attn_resolutions)}
  for channels in sorted(attended):
    try:
      attention_heads(channels, model.num_heads, model.head_dim)
    except ValueError as e:
      raise UserError(f"model.num_heads={model.num_heads}, model.head_dim={model.head_dim}: "
                      f"{e} (an attention block of the UNet)") from None


def teacher_from_config(config) -> UNet:
  """The teacher UNet; 2C output channels for a `both` teacher."""
  check_model_config(config)
  out_ch = diffusion.out_channels(config.teacher.mean_type, config.data.channels)
  return UNet(out_ch=out_ch, **_unet_fields(config))


def student_from_config(config) -> DSNO:
  """The DSNO student: x-hat at the K save times of the trajectory config."""
  check_model_config(config)
  return DSNO(out_ch=config.data.channels, num_modes=config.model.num_modes,
              num_times=len(config.trajectory.save_times),
              time_conv_formulation=time_conv_formulation(config.model.time_conv_impl),
              **_unet_fields(config))


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
  """Whether a parameter path ("a/b/c" or a tuple of names) lies in one of DSNO's TimeConvs."""
  parts = path.split("/") if isinstance(path, str) else path
  return any(str(p).split(".")[-1].startswith("time_conv") for p in parts)


# Teacher outputs whose conv_out (or its x half) is an x-hat, so the student can start from it.
X_HAT_MEAN_TYPES = ("x", "both")


def student_params_from_teacher(teacher_params, student_params, teacher_mean_type: str,
                                channels: Optional[int] = None):
  """Student tree with every teacher parameter copied in; TimeConvs keep their values.

  The student outputs x-hat, so only an `x` teacher's `conv_out` is one; for a `both` teacher
  `conv_out` keeps the x half of its output channels (as DSNO's code does). An `eps` or `v`
  teacher raises ValueError: its x-hat is z_t minus a multiple of the output, and the student
  never sees z_t, so no weights of conv_out convert. Raises ValueError (trees.check_shapes: the
  teacher's entries are the given ones, the student's other than its TimeConvs the expected
  ones) on any mismatch: never a partial copy.
  """
  if teacher_mean_type not in X_HAT_MEAN_TYPES:
    raise ValueError(
        f"train.init_from_teacher=True with teacher.mean_type={teacher_mean_type!r}: that "
        f"teacher's conv_out predicts {teacher_mean_type}, not the x-hat the student outputs, "
        "and x-hat = f(z_t, output) needs the noisy input z_t, which the student does not see, "
        "so no copy of conv_out is correct. Set train.init_from_teacher=False, or use a "
        f"teacher with teacher.mean_type in {X_HAT_MEAN_TYPES}.")
  teacher = {path: jnp.asarray(value) for path, value in
             trees.flatten(flax.core.unfreeze(teacher_params)).items()}
  student = trees.flatten(flax.core.unfreeze(student_params))
  if teacher_mean_type == "both":
    for path in [p for p in teacher if p.split("/")[0] == "conv_out"]:
      value = teacher[path]
      teacher[path] = value[..., :channels if channels is not None else value.shape[-1] // 2]
  trees.check_shapes(
      trees.shapes(teacher),
      {p: tuple(np.shape(v)) for p, v in student.items() if not is_time_conv_path(p)},
      "teacher parameters do not fit the student (missing: student entries the teacher lacks, "
      "TimeConvs aside; unexpected: teacher entries not in the student)")
  out = dict(student)
  for path, value in teacher.items():
    out[path] = value.astype(student[path].dtype)
  return trees.unflatten(out)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
