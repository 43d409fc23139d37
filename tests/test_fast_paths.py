"""Every formulation the models are built with equals the plain one (outputs and gradients,
1e-5 relative), and the backend's choice is made once, when a model is built."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dsno_jax import backend, diffusion, models
from dsno_jax.models import blocks, build, norm, time_conv
from param_utils import assert_trees_close, random_params
from reference_formulations import group_norm_film_plain, plain_group_norms


def value_and_grads(fn, *args):
  """fn's output and the gradient of sum(sin(output)) with respect to every argument."""
  out = jax.jit(fn)(*args)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args)))))(
      *args)
  return out, grads


def randn(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def test_convolutions_keep_float32_parameters_and_compute_in_the_model_dtype():
  x = jnp.ones((2, 8, 8, 3), jnp.bfloat16)
  conv = blocks.conv3x3(4, jnp.bfloat16, "conv", strides=(2, 2))
  params = conv.init(jax.random.PRNGKey(0), x)["params"]
  assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
      "kernel": ((3, 3, 3, 4), jnp.float32), "bias": ((4,), jnp.float32)}
  assert conv.apply({"params": params}, x).shape == (2, 4, 4, 4)
  assert conv.apply({"params": params}, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape,modes", [((2, 4, 3, 3, 8), 2), ((1, 5, 2, 2, 4), 3),
                                         ((2, 8, 2, 3, 4), 5), ((3, 2, 2, 2, 4), 2)])
def test_dft_time_conv_equals_fft(shape, modes):
  rng = np.random.default_rng(5)
  h = randn(rng, shape)
  params = {"weight_real": randn(rng, (shape[-1], shape[-1], modes), 0.5),
            "weight_imag": randn(rng, (shape[-1], shape[-1], modes), 0.5)}
  apply = lambda formulation: lambda p, h: time_conv.TimeConv(
      modes, formulation=formulation).apply({"params": p}, h)
  assert_trees_close(value_and_grads(apply("dft"), params, h),
                     value_and_grads(apply("fft"), params, h))


def test_unknown_time_conv_formulation_is_refused():
  with pytest.raises(ValueError, match="model.time_conv_impl='matmul'"):
    build.time_conv_formulation("matmul")
  h = jnp.zeros((1, 4, 2, 2, 4))
  with pytest.raises(ValueError, match="TimeConv formulation='auto'"):  # resolved before
    time_conv.TimeConv(formulation="auto").init(jax.random.PRNGKey(0), h)


def test_time_conv_formulation_is_chosen_when_the_model_is_built():
  config = tiny.get_config()
  assert config.model.time_conv_impl == "auto"
  assert models.student_from_config(config).time_conv_formulation == "dft"  # tests run on CPU
  assert models.DSNO(ch=32, emb_ch=64, out_ch=1, ch_mult=(1,), num_res_blocks=1,
                     attn_resolutions=()).time_conv_formulation == backend.time_conv_formulation()
  assert time_conv.TimeConv().formulation == backend.time_conv_formulation()
  for name in backend.TIME_CONV_FORMULATIONS:
    config.model.time_conv_impl = name
    assert models.student_from_config(config).time_conv_formulation == name
  assert not hasattr(models.teacher_from_config(config), "time_conv_formulation")


def flax_group_norm_film_swish(params, x, film_scale, film_shift, swish):
  y = nn.GroupNorm(num_groups=4, epsilon=1e-6).apply({"params": params}, x)
  if film_scale is not None:
    y = y * (1 + film_scale[:, None, None, :]) + film_shift[:, None, None, :]
  return nn.swish(y) if swish else y


def fused_group_norm(params, x, film_scale, film_shift, swish):
  return norm.GroupNorm(4).apply({"params": params}, x, film_scale, film_shift, swish=swish)


def plain_group_norm(params, x, film_scale, film_shift, swish):
  return group_norm_film_plain(x, params["scale"], params["bias"], 4, 1e-6, film_scale,
                               film_shift, swish)


@pytest.mark.parametrize("ours", [fused_group_norm, plain_group_norm], ids=["fused", "plain"])
@pytest.mark.parametrize("shape,film,swish", [
    ((2, 4, 4, 8), False, False), ((3, 5, 3, 8), True, True), ((2, 8, 8, 16), False, True),
    ((1, 2, 2, 4), True, False)])
def test_group_norm_equals_flax(shape, film, swish, ours):
  rng = np.random.default_rng(2)
  x = randn(rng, shape, 2.0) + 3.0  # an offset mean, as activations have
  params = {"scale": randn(rng, shape[-1:]) + 1.0, "bias": randn(rng, shape[-1:])}
  film_args = ((randn(rng, (shape[0], shape[-1]), 0.5), randn(rng, (shape[0], shape[-1])))
               if film else (None, None))
  fn = lambda impl: lambda p, x, *f: impl(p, x, *(f or film_args), swish)
  args = (params, x) + (film_args if film else ())
  assert_trees_close(value_and_grads(fn(ours), *args),
                     value_and_grads(fn(flax_group_norm_film_swish), *args))


def test_plain_group_norms_replace_the_fused_ones_inside_a_model(monkeypatch):
  """The interception the whole-model test below relies on does take effect."""
  import reference_formulations  # noqa: PLC0415
  calls = []
  monkeypatch.setattr(reference_formulations, "group_norm_film_plain",
                      lambda *a, **k: calls.append(a[0].shape) or group_norm_film_plain(*a, **k))
  rng = np.random.default_rng(6)
  x = randn(rng, (2, 4, 4, 8)) + 3.0
  params = {"scale": randn(rng, (8,)) + 1.0, "bias": randn(rng, (8,))}
  with plain_group_norms():
    out = norm.GroupNorm(4).apply({"params": params}, x, swish=True)
  assert calls == [(2, 4, 4, 8)]
  np.testing.assert_allclose(out, group_norm_film_plain(x, params["scale"], params["bias"], 4,
                                                        1e-6, swish=True), rtol=1e-6, atol=1e-6)


def test_the_built_student_equals_the_plain_one():
  """The whole DSNO: fused norms and DFT TimeConvs give the numbers of plain norms and FFTs.

  TimeConv weights are zero here: with random ones, some TimeConv updates sit within rounding
  of leaky_relu's kink, and a 1e-7 relative change of the inputs moves weight gradients by
  ~1e-2 on either path (the comparison would measure the kink, not the paths).
  """
  config = tiny.get_config()
  config.data.num_classes = 10
  params = random_params(models.param_shapes(models.init_student, config), 3, 0.1)
  params = flax.traverse_util.unflatten_dict({
      path: (jnp.zeros_like(v) if models.build.is_time_conv_path(path) else v)
      for path, v in flax.traverse_util.flatten_dict(params).items()})
  rng = np.random.default_rng(4)
  noise, labels = randn(rng, (2, 8, 8, 1)), jnp.array([1, 2])
  logsnr = jnp.asarray(diffusion.save_logsnrs(config))
  built = models.student_from_config(config)
  assert built.time_conv_formulation == "dft"
  config.model.time_conv_impl = "fft"
  fft = models.student_from_config(config)

  def plain(p):
    with plain_group_norms():
      return fft.apply({"params": p}, noise, logsnr, labels, train=False)

  assert_trees_close(
      value_and_grads(lambda p: built.apply({"params": p}, noise, logsnr, labels, train=False),
                      params),
      value_and_grads(plain, params))
