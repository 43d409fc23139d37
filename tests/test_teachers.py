"""The exact Gaussian-mixture teacher and the closed-form single-Gaussian flow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dsno_jax import diffusion, teachers


@pytest.fixture(scope="module")
def small_mixture():
  rng = np.random.default_rng(0)
  means = rng.uniform(-1, 1, (3, 2, 2, 1)).astype(np.float32)
  return teachers.GaussianMixture(means=jnp.asarray(means),
                                  variances=jnp.asarray([0.05, 0.2, 0.5], jnp.float32),
                                  weights=jnp.asarray([0.2, 0.3, 0.5], jnp.float32))


@pytest.fixture(scope="module")
def denoise():
  return jax.jit(lambda mixture, z, logsnr, y: mixture.denoise(z, logsnr, y))


def brute_force_posterior_mean(mixture, z, logsnr, y=None):
  """E[x | z] in float64 with full covariances, scipy densities and linear solves."""
  means = np.asarray(mixture.means, np.float64).reshape(mixture.num_components, -1)
  variances = np.asarray(mixture.variances, np.float64)
  weights = np.asarray(mixture.weights, np.float64)
  z = np.asarray(z, np.float64).reshape(len(z), -1)
  dim = means.shape[1]
  out = []
  for zi, lam in zip(z, np.broadcast_to(logsnr, len(z))):
    alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
    log_post, cond_means = [], []
    for mu, v, w in zip(means, variances, weights):
      cov_x = v * np.eye(dim)
      cov_z = alpha ** 2 * cov_x + sigma ** 2 * np.eye(dim)
      log_post.append(np.log(w) + stats.multivariate_normal(alpha * mu, cov_z).logpdf(zi))
      cond_means.append(mu + alpha * cov_x @ np.linalg.solve(cov_z, zi - alpha * mu))
    log_post = np.array(log_post)
    post = np.exp(log_post - log_post.max())
    post /= post.sum()
    if y is not None:
      post = np.eye(len(post))[y[len(out)]]
    out.append(post @ np.array(cond_means))
  return np.array(out).reshape((len(z),) + mixture.means.shape[1:])


def test_denoiser_matches_brute_force(small_mixture, denoise):
  z = jax.random.normal(jax.random.PRNGKey(1), (6, 2, 2, 1)) * 1.5
  logsnr = jnp.array([-20.0, -4.0, -0.5, 1.0, 6.0, 20.0])
  got = denoise(small_mixture, z, logsnr, None)
  want = brute_force_posterior_mean(small_mixture, z, np.asarray(logsnr))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(got)))


def test_denoiser_limits_and_scalar_logsnr(small_mixture, denoise):
  z = jax.random.normal(jax.random.PRNGKey(2), (4, 2, 2, 1))
  # at lam = -20 the posterior is the prior: x_hat is the mixture mean
  prior_mean = jnp.einsum("m,mhwc->hwc", small_mixture.weights, small_mixture.means)
  np.testing.assert_allclose(denoise(small_mixture, z, jnp.full((4,), -20.0), None),
                             jnp.broadcast_to(prior_mean, z.shape), atol=1e-4)
  # a noiseless observation of a point is that point
  x = small_mixture.means[jnp.array([0, 1, 2, 2])] + 0.1
  alpha, _ = diffusion.alpha_sigma(20.0)
  np.testing.assert_allclose(denoise(small_mixture, alpha * x, jnp.full((4,), 20.0), None), x,
                             atol=1e-4)
  np.testing.assert_allclose(denoise(small_mixture, z, jnp.float32(0.7), None),
                             denoise(small_mixture, z, jnp.full((4,), 0.7), None), rtol=1e-6)


def test_labels_restrict_to_their_component(small_mixture, denoise):
  z = jax.random.normal(jax.random.PRNGKey(3), (3, 2, 2, 1))
  y = jnp.array([2, 0, 1])
  logsnr = jnp.array([-1.0, 0.0, 2.0])
  got = denoise(small_mixture, z, logsnr, y)
  np.testing.assert_allclose(got, brute_force_posterior_mean(small_mixture, z, np.asarray(logsnr),
                                                            np.asarray(y)), rtol=1e-4, atol=1e-5)
  for i, k in enumerate(np.asarray(y)):
    single = teachers.GaussianMixture(small_mixture.means[k:k + 1], small_mixture.variances[k:k + 1],
                                      jnp.ones((1,)))
    np.testing.assert_allclose(got[i], single.denoise(z[i:i + 1], logsnr[i:i + 1])[0], rtol=1e-5,
                               atol=1e-6)
  assert not np.allclose(got, denoise(small_mixture, z, logsnr, None), atol=1e-3)


def test_sample_statistics(small_mixture):
  x, labels = jax.jit(small_mixture.sample, static_argnums=1)(jax.random.PRNGKey(4), 6000)
  assert x.shape == (6000, 2, 2, 1) and labels.dtype == jnp.int32
  freq = np.bincount(np.asarray(labels), minlength=3) / 6000
  np.testing.assert_allclose(freq, small_mixture.weights, atol=0.03)
  for k in range(3):
    xk = np.asarray(x)[np.asarray(labels) == k]
    np.testing.assert_allclose(xk.mean(0), small_mixture.means[k], atol=0.06)
    np.testing.assert_allclose(xk.var(0).mean(), small_mixture.variances[k], rtol=0.15)


def test_gaussian_flow_solves_the_pf_ode():
  mean = jnp.linspace(-0.5, 0.5, 4).reshape(2, 2, 1)
  variance = 0.3
  single = teachers.GaussianMixture(mean[None], jnp.array([variance]), jnp.ones((1,)))
  with jax.enable_x64(True):
    flow = jax.jit(teachers.gaussian_flow)
    z0 = jax.random.normal(jax.random.PRNGKey(5), (3, 2, 2, 1), jnp.float64)
    lam = jnp.array([-3.0, 0.5, 4.0], jnp.float64)
    z = flow(z0, mean, variance, -20.0, lam)
    np.testing.assert_allclose(flow(z, mean, variance, lam, lam), z, atol=1e-12)
    # composition: -20 -> lam -> lam + 1 equals -20 -> lam + 1
    np.testing.assert_allclose(flow(z, mean, variance, lam, lam + 1.0),
                               flow(z0, mean, variance, -20.0, lam + 1.0), atol=1e-10)
    # dz/dlam = (alpha/2) (D(z, lam) - alpha z), by central differences
    delta = 1e-4
    dz = (flow(z, mean, variance, lam, lam + delta)
          - flow(z, mean, variance, lam, lam - delta)) / (2 * delta)
    alpha = diffusion.alpha_sigma(lam)[0][:, None, None, None]
    np.testing.assert_allclose(dz, alpha / 2 * (single.denoise(z, lam) - alpha * z), atol=1e-7)
    # the noise end maps N(0, I) onto N(mean, variance) at the data end
    z_big = jax.random.normal(jax.random.PRNGKey(6), (20000, 2, 2, 1), jnp.float64)
    x = flow(z_big, mean, variance, -20.0, 20.0)
    np.testing.assert_allclose(x.mean(0), mean, atol=0.02)
    np.testing.assert_allclose(x.var(0).mean(), variance, rtol=0.03)


def test_digits_mixture_statistics():
  from sklearn.datasets import load_digits
  mixture = teachers.digits_mixture(8)
  assert mixture.means.shape == (10, 8, 8, 1)
  assert mixture.variances.shape == mixture.weights.shape == (10,)
  np.testing.assert_allclose(float(mixture.weights.sum()), 1.0, rtol=1e-6)
  digits = load_digits()
  threes = digits.images[digits.target == 3] / 8.0 - 1.0
  np.testing.assert_allclose(mixture.means[3, ..., 0], threes.mean(0), atol=1e-6)
  np.testing.assert_allclose(mixture.variances[3], ((threes - threes.mean(0)) ** 2).mean(), rtol=1e-5)
  assert float(mixture.means.min()) >= -1.0 and float(mixture.means.max()) <= 1.0
  big = teachers.digits_mixture(16)
  assert big.means.shape == (10, 16, 16, 1)
  np.testing.assert_allclose(big.weights, mixture.weights)
  # resizing keeps the overall brightness of each class
  np.testing.assert_allclose(big.means.mean((1, 2, 3)), mixture.means.mean((1, 2, 3)), atol=0.05)


def test_mixture_is_a_pytree(small_mixture):
  leaves, treedef = jax.tree_util.tree_flatten(small_mixture)
  assert len(leaves) == 3
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  np.testing.assert_array_equal(rebuilt.means, small_mixture.means)


def test_bad_arguments_raise(small_mixture):
  with pytest.raises(ValueError, match="means"):
    teachers.GaussianMixture(jnp.zeros((3, 2, 2)), jnp.ones((3,)), jnp.ones((3,)))
  with pytest.raises(ValueError, match="variances"):
    teachers.GaussianMixture(jnp.zeros((3, 2, 2, 1)), jnp.ones((2,)), jnp.ones((3,)))
  with pytest.raises(ValueError, match="z has shape"):
    small_mixture.denoise(jnp.zeros((4, 3, 3, 1)), 0.0)
  with pytest.raises(ValueError, match="labels y"):
    small_mixture.denoise(jnp.zeros((4, 2, 2, 1)), 0.0, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="logsnr"):
    small_mixture.denoise(jnp.zeros((4, 2, 2, 1)), jnp.zeros((3,)))
  with pytest.raises(ValueError, match="image_size"):
    teachers.digits_mixture(0)
