"""The cosine log-SNR schedule and the output parameterisations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsno_jax import diffusion


def test_schedule_endpoints_and_inverse():
  t = jnp.linspace(0.0, 1.0, 101)
  lam = diffusion.logsnr_schedule_cosine(t)
  np.testing.assert_allclose(lam[0], 20.0, atol=1e-4)
  np.testing.assert_allclose(lam[-1], -20.0, atol=2e-3)  # float32 tan near pi/2
  assert np.all(np.diff(np.asarray(lam)) < 0)
  np.testing.assert_allclose(diffusion.t_from_logsnr(lam), t, atol=1e-5)


def test_schedule_matches_formula_in_float64():
  t = np.linspace(0, 1, 17)
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  want = -2 * np.log(np.tan(a * t + b))
  np.testing.assert_allclose(diffusion.logsnr_schedule_cosine(t), want, rtol=1e-4, atol=2e-3)


def test_alpha_sigma_variance_preserving():
  lam = jnp.linspace(-20, 20, 41)
  alpha, sigma = diffusion.alpha_sigma(lam)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2), lam, atol=1e-3)


@pytest.mark.parametrize("mean_type", ["x", "eps", "v", "both"])
def test_every_output_type_recovers_x(mean_type):
  kx, ke = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.uniform(kx, (3, 4, 4, 2), minval=-1, maxval=1)
  eps = jax.random.normal(ke, x.shape)
  lam = jnp.array([-3.0, 0.5, 4.0])
  z = diffusion.diffuse(x, eps, lam)
  outputs = {
      "x": x,
      "eps": eps,
      "v": diffusion.v_from_x_eps(x, eps, lam),
      "both": jnp.concatenate([x, eps], axis=-1),
  }
  x_hat = diffusion.x_from_output(outputs[mean_type], z, lam, mean_type)
  np.testing.assert_allclose(x_hat, x, atol=1e-4)


def test_both_mixes_with_sigmoid_of_minus_logsnr():
  z = jnp.zeros((1, 1, 1, 1))
  lam = jnp.array([1.3])
  out = jnp.concatenate([jnp.full((1, 1, 1, 1), 0.5), jnp.zeros((1, 1, 1, 1))], -1)
  # with z = 0 and eps = 0 the eps branch gives x = 0; the mix is w * 0.5
  want = 0.5 * jax.nn.sigmoid(-1.3)
  np.testing.assert_allclose(diffusion.x_from_output(out, z, lam, "both"), want, rtol=1e-6)


def test_denoiser_clips_and_rejects_unknown_type():
  denoise = diffusion.make_denoiser(lambda z, lam, y: 3.0 * jnp.ones_like(z), "x", clip_x=True)
  assert float(denoise(jnp.zeros((2, 2, 2, 1)), 0.0).max()) == 1.0
  with pytest.raises(ValueError, match="mean_type='eps2'"):
    diffusion.make_denoiser(lambda *a: None, "eps2")


def test_time_weights():
  lam = jnp.array([-5.0, 0.0, 4.0, 30.0])
  np.testing.assert_allclose(diffusion.time_weights(lam, "snr"), [1.0, 1.0, np.e**2, 1e4], rtol=1e-5)
  np.testing.assert_allclose(diffusion.time_weights(lam, "uniform"), 1.0)
  with pytest.raises(ValueError, match="'sqrt'"):
    diffusion.time_weights(lam, "sqrt")
