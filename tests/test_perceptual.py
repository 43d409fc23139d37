"""Both VGG16 distances equal the `lpips` package on its random-trunk weights, via our converter:
`lpips` is LPIPS(net='vgg'), `vgg` is LPIPS(net='vgg', lpips=False), DSNO's CIFAR-10 loss."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
lpips = pytest.importorskip("lpips")

from dsno_jax import convert  # noqa: E402
from dsno_jax.models import vgg  # noqa: E402
from dsno_jax.training import losses, perceptual  # noqa: E402
from dsno_jax.weights import torch_pickle  # noqa: E402

SIZE = 32  # > 16, the least size at which relu5_3 (after 4 max-pools) still has a pixel
TOLERANCE = 1e-5  # relative; the two agree to about 1e-7


@pytest.fixture(scope="module")
def lpips_model():
  """lpips.LPIPS(net='vgg') with a random trunk (random biases too) and the shipped heads."""
  torch.manual_seed(0)
  model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
  with torch.no_grad():
    for name, value in model.net.named_parameters():
      if name.endswith(".bias"):  # torchvision initialises them to 0; make the mapping count
        value.uniform_(-0.1, 0.1)
  return model.eval()


@pytest.fixture(scope="module")
def plain_model(lpips_model):
  """lpips.LPIPS(net='vgg', lpips=False, pretrained=False): no heads, the same random trunk."""
  model = lpips.LPIPS(net="vgg", lpips=False, pretrained=False, pnet_rand=True, verbose=False)
  model.net.load_state_dict(lpips_model.net.state_dict())
  return model.eval()


@pytest.fixture(scope="module")
def files(lpips_model, tmp_path_factory):
  """The model's state dict and its trunk in torchvision's names, each as a .pth; the heads
  file the package ships; the whole state dict converted to an .npz."""
  root = tmp_path_factory.mktemp("perceptual")
  state = lpips_model.state_dict()
  paths = {name: str(root / f"{name}.pth") for name in ("whole", "vgg16")}
  torch.save(state, paths["whole"])
  # LPIPS's slices keep torchvision's feature indices: net.slice2.5.weight = features.5.weight.
  torch.save({"features." + k.split(".", 2)[2]: v for k, v in state.items()
              if k.startswith("net.")}, paths["vgg16"])
  paths["heads"] = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
  paths["lpips_npz"] = str(root / "lpips_vgg.npz")
  convert.convert("lpips", paths["whole"], paths["lpips_npz"])
  return paths


@pytest.fixture(scope="module")
def images():
  """Three pairs of 32x32 RGB images in [-1, 1]; the last pair is identical."""
  rng = np.random.default_rng(0)
  x, y = rng.uniform(-1, 1, (2, 3, SIZE, SIZE, 3)).astype(np.float32)
  y = (0.6 * x + 0.4 * y).astype(np.float32)  # related images, like a prediction and its target
  y[2] = x[2]
  return x, y


@jax.jit
def _distances_and_lpips_grad(weights, x, y):
  """LPIPS (N,), the plain VGG distance (N,), d sum(LPIPS) / dx; one compilation serves all."""
  lpips_value, grad = jax.vmap(
      jax.value_and_grad(lambda x, y: perceptual.lpips_distance(weights, x[None], y[None])[0]))(
          x, y)
  return lpips_value, perceptual.vgg_feature_distance(weights, x, y), grad


@pytest.fixture(scope="module")
def jax_outputs(files, images):
  weights = perceptual.load_weights(files["lpips_npz"], "lpips")
  return tuple(map(np.asarray, _distances_and_lpips_grad(weights, *map(jnp.asarray, images))))


def _torch_nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def test_distances_equal_the_lpips_package(lpips_model, plain_model, images, jax_outputs):
  lpips_jax, vgg_jax, _ = jax_outputs
  tx, ty = map(_torch_nchw, images)
  with torch.no_grad():
    lpips_torch = lpips_model(tx, ty).reshape(-1).numpy()
    vgg_torch = plain_model(tx, ty).reshape(-1).numpy()
    # The channel mean (the distance this loss used to be) differs by the taps' widths, so the
    # comparison below tells the two apart.
    taps_x = lpips_model.net(lpips_model.scaling_layer(tx))
    taps_y = lpips_model.net(lpips_model.scaling_layer(ty))
    channel_mean = sum(
        ((lpips.normalize_tensor(a) - lpips.normalize_tensor(b)) ** 2).mean(dim=(1, 2, 3))
        for a, b in zip(taps_x, taps_y)).numpy()
  assert lpips_torch.shape == lpips_jax.shape == vgg_jax.shape == (3,)
  assert np.all(lpips_torch[:2] > 0.01) and np.all(vgg_torch[:2] > 0.1)
  assert np.all(vgg_torch[:2] > 30 * channel_mean[:2])
  np.testing.assert_allclose(lpips_jax, lpips_torch, rtol=TOLERANCE, atol=1e-8)
  np.testing.assert_allclose(vgg_jax, vgg_torch, rtol=TOLERANCE, atol=1e-8)
  np.testing.assert_allclose(lpips_jax[2], 0, atol=1e-10)


def test_gradients_are_finite(jax_outputs):
  """d LPIPS / d prediction: finite, non-zero, and (numerically) zero at prediction = target."""
  grad = jax_outputs[2]
  assert np.all(np.isfinite(grad)) and np.all(np.abs(grad[:2]).max(axis=(1, 2, 3)) > 0)
  assert np.abs(grad[2]).max() < 1e-3 * np.abs(grad[:2]).max()


def test_heads_file_plus_torchvision_trunk_converts_the_same(files, tmp_path):
  dst = str(tmp_path / "from_parts.npz")
  assert convert.main(["--kind", "lpips", "--src", files["heads"],
                       "--vgg16", files["vgg16"], "--dst", dst]) == 0
  vgg_only = str(tmp_path / "vgg16.npz")
  assert convert.main(["--kind", "vgg16", "--src", files["vgg16"], "--dst", vgg_only]) == 0
  with np.load(files["lpips_npz"]) as whole, np.load(dst) as parts, np.load(vgg_only) as trunk:
    assert sorted(whole.files) == sorted(parts.files)
    assert len(whole.files) == 26 + 5 and len(trunk.files) == 26
    for key in whole.files:
      np.testing.assert_array_equal(whole[key], parts[key])
    for key in trunk.files:
      np.testing.assert_array_equal(whole[key], trunk[key])
  # The torch layout (O, I, kH, kW) became Flax's (kH, kW, I, O).
  state = torch_pickle.load_state_dict(files["vgg16"])
  with np.load(vgg_only) as trunk:
    np.testing.assert_array_equal(trunk["vgg/conv2_1/kernel"],
                                  state["features.5.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match="holds only the VGG16 trunk"):
    perceptual.load_weights(vgg_only, "lpips")
  assert set(perceptual.load_weights(vgg_only, "vgg")) == {"vgg"}


def test_converter_rejects_other_networks(files, tmp_path):
  foreign = str(tmp_path / "foreign.pth")
  torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(1000)}, foreign)
  with pytest.raises(ValueError, match="is not torchvision's VGG16 state dict"):
    convert.convert("vgg16", foreign, str(tmp_path / "x.npz"))
  with pytest.raises(ValueError, match=r"is not LPIPS\(net='vgg'\) weights"):
    convert.convert("lpips", foreign, str(tmp_path / "x.npz"))
  with pytest.raises(ValueError, match="pass it with --vgg16"):
    convert.convert("lpips", files["heads"], str(tmp_path / "x.npz"))
  # A VGG16 with batch norm shifts every feature index: rejected, not silently misread.
  state = torch_pickle.load_state_dict(files["vgg16"])
  shifted = {k.replace("features.5.", "features.6."): torch.from_numpy(v)
             for k, v in state.items()}
  torch.save(shifted, foreign)
  assert convert.main(["--kind", "vgg16", "--src", foreign,
                       "--dst", str(tmp_path / "x.npz")]) == 1
  assert not os.path.exists(tmp_path / "x.npz")


def test_missing_weights_say_what_to_download_and_how_to_convert(tmp_path):
  missing = str(tmp_path / "lpips_vgg.npz")
  with pytest.raises(FileNotFoundError, match=r"(?s)vgg16-397923af\.pth.*lpips/weights/v0\.1/"
                     r"vgg\.pth.*python -m dsno_jax\.convert --kind lpips"):
    losses.get_distance("lpips", missing)
  with pytest.raises(FileNotFoundError, match=r"(?s)perceptual_weights is not set.*--kind vgg16"):
    losses.get_distance("vgg", "")


def test_per_time_convention_is_the_batch_mean_per_output_time():
  rng = np.random.default_rng(2)
  prediction, target = rng.normal(size=(2, 3, 4, 5, 6, 1)).astype(np.float32)
  squared_error = lambda weights, x, y: jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  per_time = perceptual.per_time_distance(squared_error, None)(prediction, target)
  np.testing.assert_allclose(per_time, losses.l2_distance(prediction, target), rtol=1e-6)


def test_registry_gives_per_time_distances(files):
  """The registered distances map (B, K, H, W, C) grey 16x16 images (repeated to RGB) to (K,),
  and trace under jit and grad with the weights of the file."""
  shape = jax.ShapeDtypeStruct((2, 3, 16, 16, 1), jnp.float32)
  for name in ("lpips", "vgg"):
    distance = losses.get_distance(name, files["lpips_npz"])
    assert jax.eval_shape(jax.jit(distance), shape, shape).shape == (3,)
    grad = jax.eval_shape(jax.grad(lambda p, t: jnp.sum(distance(p, t))), shape, shape)
    assert grad.shape == shape.shape


def test_unit_normalize_has_finite_gradient_at_zero():
  f = jnp.zeros((2, 4, 4, 8)).at[0].set(1.0)
  grad = jax.jit(jax.grad(lambda f: jnp.sum(perceptual.unit_normalize(f) ** 2)))(f)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(perceptual.unit_normalize(f)[0], np.full((4, 4, 8), 8 ** -0.5),
                             rtol=1e-6)


def test_too_small_images_are_refused():
  params = jax.eval_shape(functools.partial(vgg.VGG16Features().init, jax.random.PRNGKey(0)),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))["params"]
  assert vgg.torch_feature_indices()["conv5_3"] == 28
  with pytest.raises(ValueError, match="H, W >= 16"):
    jax.eval_shape(lambda p, x: vgg.VGG16Features().apply({"params": p}, x), params,
                   jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
