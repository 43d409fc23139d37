"""DSNO's TimeConv (Zheng et al. 2023, Section 3) against an explicit float64 DFT, and its
frequency cut-off, in both formulations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsno_jax.models import TimeConv


def reference_time_conv(h, w_real, w_imag):
  """float64 numpy through explicit DFT sums (no FFT): h (B,K,H,W,C)."""
  h = np.asarray(h, np.float64)
  k = h.shape[1]
  w = np.asarray(w_real, np.float64) + 1j * np.asarray(w_imag, np.float64)
  modes = min(w.shape[-1], k // 2 + 1)
  n = np.arange(k)
  update = np.zeros(h.shape, np.float64)
  for f in range(modes):
    basis = np.exp(-2j * np.pi * f * n / k)  # forward DFT row, no normalisation
    x_f = np.einsum("n,bnhwc->bhwc", basis, h)
    y_f = np.einsum("bhwi,io->bhwo", x_f, w[:, :, f])
    # inverse real DFT of a half spectrum: DC and Nyquist once (real part), others twice
    nyquist = k % 2 == 0 and f == k // 2
    mult = 1.0 if (f == 0 or nyquist) else 2.0
    wave = np.exp(2j * np.pi * f * n / k)
    update += mult * np.real(np.einsum("n,bhwc->bnhwc", wave, y_f)) / k
  return h + np.where(update > 0, update, 0.01 * update)


@pytest.mark.parametrize("formulation", ["fft", "dft"])
@pytest.mark.parametrize("k", range(1, 9))
def test_time_conv_equals_explicit_dft(k, formulation):
  c, modes = 4, 2
  h = jax.random.normal(jax.random.PRNGKey(k), (2, k, 3, 3, c))
  params = TimeConv(num_modes=modes).init(jax.random.PRNGKey(0), h)["params"]
  # larger weights than the init so that the update is not negligible
  params = jax.tree_util.tree_map(lambda w: 2.0 * w - 1.0, params)
  got = TimeConv(num_modes=modes, formulation=formulation).apply({"params": params}, h)
  want = reference_time_conv(h, params["weight_real"], params["weight_imag"])
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5, rtol=1e-5)


def test_init_is_uniform_scaled_by_channels():
  h = jnp.zeros((1, 4, 2, 2, 8))
  params = TimeConv(num_modes=3).init(jax.random.PRNGKey(0), h)["params"]
  for name in ("weight_real", "weight_imag"):
    w = np.asarray(params[name])
    assert w.shape == (8, 8, 3) and w.dtype == np.float32
    assert w.min() >= 0.0 and w.max() < 1.0 / 64


def test_high_frequencies_produce_no_update():
  k, modes = 8, 2
  n = np.arange(k)
  # content only at time frequencies 2 and 3 (>= num_modes)
  wave = np.cos(2 * np.pi * 2 * n / k) + np.sin(2 * np.pi * 3 * n / k)
  h = jnp.asarray(np.broadcast_to(wave[None, :, None, None, None], (2, k, 3, 3, 4)), jnp.float32)
  params = TimeConv(num_modes=modes).init(jax.random.PRNGKey(0), h)["params"]
  params = jax.tree_util.tree_map(lambda w: 100.0 * w, params)
  out = TimeConv(num_modes=modes).apply({"params": params}, h)
  np.testing.assert_allclose(out, h, atol=1e-5)
  # ... while content at frequency 1 does change the output
  low = jnp.asarray(np.broadcast_to(np.cos(2 * np.pi * n / k)[None, :, None, None, None],
                                    h.shape), jnp.float32)
  assert float(jnp.abs(TimeConv(num_modes=modes).apply({"params": params}, low) - low).max()) > 1e-2


def test_bfloat16_input_is_computed_in_float32():
  h = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2, 2, 4))
  params = TimeConv().init(jax.random.PRNGKey(1), h)["params"]
  out = TimeConv().apply({"params": params}, h.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  want = reference_time_conv(h.astype(jnp.bfloat16).astype(jnp.float32),
                             params["weight_real"], params["weight_imag"])
  np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-2, atol=1e-2)
