"""Teacher import: PD msgpack and save_model exports give the same denoiser; bad files fail clearly."""
import json
import pickle

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dsno_jax import diffusion, models, teachers
from dsno_jax.models import io as model_io
from dsno_jax.teachers import loading


def _tiny():
  config = tiny.get_config()
  config.teacher.mean_type = "eps"  # exercises the output conversion, not just a copy
  return config


def random_params(shapes, seed=1):
  """Numpy parameters of these shapes: unit-ish scales, fan-in scaled kernels, small biases.

  (Cheaper than compiling models.init_teacher, and conv_out is not zero.)
  """
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    noise = rng.standard_normal(spec.shape)
    if path[-1].key == "scale":
      return (1.0 + 0.1 * noise).astype(np.float32)
    if path[-1].key == "kernel":
      return (noise / np.sqrt(np.prod(spec.shape[:-1]))).astype(np.float32)
    return (0.05 * noise).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def teacher():
  """(random teacher params, inputs, the reference denoiser's x_hat)."""
  config = _tiny()
  params = random_params(models.param_shapes(models.init_teacher, config))
  z = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1))
  logsnr = jnp.array([-1.0, 0.0, 3.0, 8.0])
  y = jnp.array([0, 3, 7, 9])
  reference = diffusion.unet_denoiser(models.teacher_from_config(config), params,
                                      config.teacher.mean_type, config.teacher.clip_x)
  x_hat = np.asarray(jax.jit(reference)(z, logsnr, y))
  return params, (z, logsnr, y), x_hat


_apply = jax.jit(lambda denoise, z, logsnr, y: denoise(z, logsnr, y))


def _pd_checkpoint(path, params):
  state = {"step": 1234, "ema_params": params, "num_sample_steps": 1024,
           "optimizer": {"target": params, "state": {"step": 1234}}}
  path.write_bytes(flax.serialization.to_bytes(state))
  return str(path)


def test_pd_msgpack_gives_the_same_denoiser(teacher, tmp_path):
  params, inputs, x_hat = teacher
  config = _tiny()
  config.teacher.checkpoint = _pd_checkpoint(tmp_path / "pd.msgpack", params)
  denoise, identity = loading.load_teacher(config, str(tmp_path / "unused"))
  assert identity == ("unet:pd_msgpack:mean_type=eps:clip_x=True:params_sha256="
                      + loading.params_digest(params))
  got = np.asarray(_apply(denoise, *inputs))
  np.testing.assert_allclose(got, x_hat, rtol=1e-4, atol=1e-4)
  assert np.mean(np.abs(x_hat) < 0.99) > 0.5  # mostly not clipped: a real comparison


def test_teacher_dtype_is_its_own_not_the_students(teacher, tmp_path):
  """A bfloat16 student (model.dtype) keeps a float32 teacher unless teacher.dtype says so."""
  params, inputs, x_hat = teacher
  config = _tiny()
  config.teacher.checkpoint = _pd_checkpoint(tmp_path / "pd.msgpack", params)
  config.model.dtype = "bfloat16"
  denoise, identity = loading.load_teacher(config, str(tmp_path / "unused"))
  np.testing.assert_allclose(np.asarray(_apply(denoise, *inputs)), x_hat, rtol=1e-4, atol=1e-4)
  assert "dtype" not in identity
  config.teacher.dtype = "bfloat16"
  denoise, identity = loading.load_teacher(config, str(tmp_path / "unused"))
  bf16 = np.asarray(_apply(denoise, *inputs))
  assert identity.endswith(":dtype=bfloat16")  # trajectories record it
  assert 1e-3 < np.abs(bf16 - x_hat).max() < 0.2  # bfloat16 really ran, and stayed close
  config.teacher.dtype = "float16"
  with pytest.raises(ValueError, match=r"teacher.dtype='float16'; expected one of"):
    loading.load_teacher(config, str(tmp_path / "unused"))


def test_pd_msgpack_with_merged_kernel_axes_is_reshaped(teacher, tmp_path):
  params, inputs, x_hat = teacher
  config = _tiny()
  flat = flax.traverse_util.flatten_dict(params)
  q = next(p for p in flat if p[-2] == "q" and p[-1] == "kernel")  # (C, heads, head_dim)
  flat[q] = flat[q].reshape(flat[q].shape[0], -1)  # as older flax stored DenseGeneral kernels
  config.teacher.checkpoint = _pd_checkpoint(tmp_path / "old.msgpack",
                                             flax.traverse_util.unflatten_dict(flat))
  denoise, _ = loading.load_teacher(config, "")
  np.testing.assert_allclose(np.asarray(_apply(denoise, *inputs)), x_hat, rtol=1e-4, atol=1e-4)


def test_save_model_export_and_workdir_teacher(teacher, tmp_path):
  params, inputs, x_hat = teacher
  config = _tiny()
  with pytest.raises(FileNotFoundError, match="Run --mode=train_teacher first"):
    loading.load_teacher(config, str(tmp_path))
  model_io.save_model(str(tmp_path / "teacher"), params, config, role="teacher")
  denoise, identity = loading.load_teacher(config, str(tmp_path))  # WORKDIR/teacher
  np.testing.assert_allclose(np.asarray(_apply(denoise, *inputs)), x_hat, rtol=1e-4, atol=1e-4)
  config.teacher.checkpoint = str(tmp_path / "teacher")
  denoise2, identity2 = loading.load_teacher(config, "")
  assert identity == identity2 and identity.startswith("unet:dsno_jax_export:")
  np.testing.assert_array_equal(np.asarray(_apply(denoise2, *inputs)),
                                np.asarray(_apply(denoise, *inputs)))
  params2, identity3 = loading.load_teacher_params(config, "")
  assert identity3 == identity
  for a, b in zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  # an export built with another output type is refused, not silently misread
  other = _tiny()
  other.teacher.mean_type = "v"
  other.teacher.checkpoint = config.teacher.checkpoint
  with pytest.raises(ValueError, match="teacher.mean_type: saved 'eps', config 'v'"):
    loading.load_teacher(other, "")
  model_io.save_model(str(tmp_path / "student"), params, config, role="student")
  config.teacher.checkpoint = str(tmp_path / "student")
  with pytest.raises(ValueError, match="student export; expected role 'teacher'"):
    loading.load_teacher(config, "")


def test_checkpoint_of_another_config_lists_every_mismatch(tmp_path):
  config = _tiny()
  other = _tiny()
  other.model.emb_ch = 32  # wrong shapes
  other.model.num_res_blocks = 2  # unexpected entries
  other.model.attn_resolutions = ()  # missing entries
  other_params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                        models.param_shapes(models.init_teacher, other))
  config.teacher.checkpoint = _pd_checkpoint(tmp_path / "other.msgpack", other_params)
  with pytest.raises(ValueError) as error:
    loading.load_teacher(config, "")
  message = str(error.value)
  assert "missing: [" in message and "'down_1.attn_0/q/kernel'" in message
  assert "unexpected: [" in message and "'down_0.block_1/conv1/kernel'" in message
  assert "wrongly shaped: [" in message and "'dense0/kernel: (32, 32), expected (32, 64)'" in message


def test_merged_axes_are_reshaped_but_transposes_are_not():
  assert loading._merges_axes((32, 64), (32, 1, 64)) and loading._merges_axes((6, 4), (2, 3, 4))
  assert not loading._merges_axes((32, 64), (64, 32))
  assert not loading._merges_axes((6, 4), (4, 3, 2))  # same size, different layout


@pytest.mark.parametrize("content", [
    b"\x00\x93\xff" + bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8)),
    json.dumps({"ema_params": {"w": [1, 2]}}).encode(),
    b"",
])
def test_files_that_are_not_checkpoints_get_a_clear_error(content, tmp_path):
  path = tmp_path / "not_a_checkpoint"
  path.write_bytes(content)
  config = _tiny()
  config.teacher.checkpoint = str(path)
  with pytest.raises(ValueError, match="expected a Progressive Distillation checkpoint"):
    loading.load_teacher(config, "")


class _Trap:
  """Unpickling this would create a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_a_pickle_is_refused_and_never_executed(tmp_path):
  marker = tmp_path / "executed"
  path = tmp_path / "teacher.pkl"
  path.write_bytes(pickle.dumps({"ema_params": _Trap(str(marker))}))
  config = _tiny()
  config.teacher.checkpoint = str(path)
  with pytest.raises(ValueError, match="not a flax msgpack file"):
    loading.load_teacher(config, "")
  assert not marker.exists()


def test_msgpack_without_ema_params_and_missing_paths(tmp_path):
  config = _tiny()
  path = tmp_path / "state.msgpack"
  path.write_bytes(flax.serialization.to_bytes({"step": 3, "params": {"w": np.ones(2)}}))
  config.teacher.checkpoint = str(path)
  with pytest.raises(ValueError, match=r"holds \['params', 'step'\], with no 'ema_params'"):
    loading.load_teacher(config, "")
  config.teacher.checkpoint = str(tmp_path / "nope.msgpack")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loading.load_teacher(config, "")
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  config.teacher.checkpoint = str(empty_dir)
  with pytest.raises(ValueError, match="expected a teacher directory written by save_model"):
    loading.load_teacher(config, "")


def test_digits_mixture_teacher_and_bad_kind():
  config = _tiny()
  config.teacher.kind = "digits_mixture"
  denoise, identity = loading.load_teacher(config, "")
  assert identity == "digits_mixture:image_size=8"
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  logsnr, y = jnp.array([0.0, 2.0]), jnp.array([1, 5])
  want = teachers.digits_mixture(8).denoise(z, logsnr, y)
  np.testing.assert_allclose(np.asarray(_apply(denoise, z, logsnr, y)), np.asarray(want),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="no UNet parameters"):
    loading.load_teacher_params(config, "")
  config.teacher.kind = "vae"
  with pytest.raises(ValueError, match=r"teacher.kind='vae'; expected one of \('unet', "):
    loading.load_teacher(config, "")
