"""The Flax FID Inception equals pytorch-fid's; the torch-free converter and its refusals."""
import collections
import os
import pickle
import unittest.mock
import zipfile

import numpy as np
import pytest

from dsno_jax import convert
from dsno_jax.evaluation import inception
from dsno_jax.weights import torch_pickle

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")


def fid_inception_v3_random():
  """pytorch-fid's `fid_inception_v3()` with the same FID blocks, minus the weight download."""
  pfi = pytorch_fid_inception
  net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                        init_weights=False)
  net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfi.FIDInceptionE_1(1280)
  net.Mixed_7c = pfi.FIDInceptionE_2(2048)
  return net


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """pytorch-fid's InceptionV3 (random weights) on 2 uint8 images; its state dict as a .pth."""
  torch.set_num_threads(2)
  net = fid_inception_v3_random()
  with unittest.mock.patch.object(pytorch_fid_inception, "fid_inception_v3", lambda: net):
    model = pytorch_fid_inception.InceptionV3([3])  # resize_input and normalize_input on
  generator = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=generator)
  x01 = images.float() / 255.0  # what pytorch-fid's data loader feeds (ToTensor)
  # Random BatchNorm statistics, set from these very images so that every layer sees
  # unit-scale activations (default statistics would shrink them to nothing).
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = None
      module.weight.data.uniform_(0.5, 1.5, generator=generator)
      module.bias.data.normal_(0.5, 0.2, generator=generator)
  with torch.no_grad():
    model.train()
    model(x01)
    model.eval()
    features = model(x01)[0][:, :, 0, 0].numpy()
  directory = tmp_path_factory.mktemp("inception")
  pth = str(directory / "random_fid_inception.pth")
  torch.save(net.state_dict(), pth)
  return dict(images=images.permute(0, 2, 3, 1).numpy(), features=features, pth=pth,
              state_dict=net.state_dict(), directory=directory)


@pytest.fixture(scope="module")
def converted(reference):
  npz = str(reference["directory"] / "inception_fid.npz")
  assert convert.main(["--kind", "inception", "--src", reference["pth"], "--dst", npz]) == 0
  return inception.load_params(npz)


def test_flax_inception_equals_pytorch_fid(reference, converted):
  features = np.asarray(inception.inception_features(converted, reference["images"]))
  assert features.shape == (2, inception.FEATURE_DIM)
  assert reference["features"].std() > 0.1  # activations did not collapse
  np.testing.assert_allclose(features, reference["features"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 8, 8, 1), (1, 300, 451, 3), (1, 299, 299, 3)])
def test_preprocess_equals_pytorch_fid_resize(shape):
  images = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
  x01 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x01 = x01.expand(-1, 3, -1, -1)
  expected = 2 * torch.nn.functional.interpolate(
      x01, size=(299, 299), mode="bilinear", align_corners=False) - 1
  expected = expected.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(inception.preprocess(images)), expected, atol=1e-6)
  # The same images as floats in [-1, 1] or [0, 1] give the same network input.
  minus1_1 = images.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(np.asarray(inception.preprocess(minus1_1)), expected, atol=1e-6)
  zero_1 = images.astype(np.float32) / 255.0
  np.testing.assert_allclose(np.asarray(inception.preprocess(zero_1, (0.0, 1.0))), expected,
                             atol=1e-6)


def test_legacy_pth_format_converts_identically(reference, converted, tmp_path):
  legacy = str(tmp_path / "legacy.pth")
  torch.save(reference["state_dict"], legacy, _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(legacy)
  params = inception.flax_params_from_state_dict(torch_pickle.load_state_dict(legacy))
  np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["conv"]["kernel"],
                                converted["Mixed_7c"]["branch_pool"]["conv"]["kernel"])
  np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["bn"]["var"],
                                converted["Conv2d_1a_3x3"]["bn"]["var"])


def test_torch_pickle_reads_tensors_of_every_layout(tmp_path):
  state = collections.OrderedDict(
      weight=torch.randn(3, 4), transposed=torch.randn(4, 3).t(), sliced=torch.arange(10)[2:7],
      scalar=torch.tensor(2.5), half=torch.randn(5).half(), empty=torch.zeros(0, 2),
      shared=torch.arange(6.0).view(2, 3))
  for legacy in (False, True):
    path = str(tmp_path / f"state_{legacy}.pth")
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    loaded = torch_pickle.load_state_dict(path)
    assert list(loaded) == list(state)
    for name, tensor in state.items():
      assert loaded[name].dtype == tensor.numpy().dtype, name
      np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)


def test_converter_rejects_another_network(reference, tmp_path, capsys):
  other = str(tmp_path / "linear.pth")
  torch.save(torch.nn.Linear(3, 4).state_dict(), other)
  with pytest.raises(ValueError, match="not pytorch-fid's FID Inception-v3 state dict"):
    convert.convert("inception", other, str(tmp_path / "out.npz"))
  assert convert.main(["--kind", "inception", "--src", other,
                       "--dst", str(tmp_path / "out.npz")]) == 1
  assert "unexpected: ['bias', 'weight']" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out.npz")

  state = {k: v.numpy() for k, v in reference["state_dict"].items()}
  wrong_shape = dict(state, **{"Mixed_6b.branch7x7_2.conv.weight": np.zeros((128, 128, 7, 1))})
  with pytest.raises(ValueError,
                     match=r"wrongly shaped: \['Mixed_6b\.branch7x7_2\.conv\.weight: "
                           r".*\(128, 128, 7, 1\)"):
    inception.flax_params_from_state_dict(wrong_shape)
  # torchvision's own ImageNet Inception: same trunk, but a 1000-way head and aux logits.
  imagenet = dict(state, **{"fc.weight": np.zeros((1000, 2048)), "fc.bias": np.zeros(1000),
                            "AuxLogits.fc.weight": np.zeros((1000, 768))})
  with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
    inception.flax_params_from_state_dict(imagenet)
  missing = {k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}
  with pytest.raises(ValueError, match="Mixed_7c"):
    inception.flax_params_from_state_dict(missing)


def test_pickle_with_a_forbidden_global_is_refused_unexecuted(tmp_path):
  marker = tmp_path / "executed"
  # Protocol 0 by hand: GLOBAL 'os system', then REDUCE with one string argument.
  payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
  legacy = tmp_path / "evil_legacy.pth"
  legacy.write_bytes(payload)
  archive = tmp_path / "evil_zip.pth"
  with zipfile.ZipFile(archive, "w") as z:
    z.writestr("evil_zip/data.pkl", payload)
  for path in (legacy, archive):
    with pytest.raises(torch_pickle.ForbiddenGlobalError, match=r"global os\.system"):
      torch_pickle.load_pth(str(path))
  # A pickled nn.Module names torch classes and is refused the same way.
  module_pth = tmp_path / "module.pth"
  with open(module_pth, "wb") as f:
    pickle.dump(collections.OrderedDict(x=torch.nn.Identity()), f, protocol=2)
  with pytest.raises(torch_pickle.ForbiddenGlobalError, match="torch.nn.modules.linear.Identity"):
    torch_pickle.load_pth(str(module_pth))
  assert not marker.exists()


def test_missing_weights_say_what_to_download(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    inception.load_params(str(tmp_path / "absent.npz"))
  message = str(info.value)
  for needed in ("pt_inception-2015-12-05-6726825d.pth", "github.com/mseitzer/pytorch-fid",
                 "python -m dsno_jax.convert --kind inception"):
    assert needed in message
  with pytest.raises(FileNotFoundError, match="absent.pth"):
    torch_pickle.load_pth(str(tmp_path / "absent.pth"))


def test_loader_rejects_an_npz_of_another_network(tmp_path):
  path = str(tmp_path / "other.npz")
  np.savez(path, **{"Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 32), np.float32)})
  with pytest.raises(ValueError, match="not the FID Inception-v3"):
    inception.load_params(path)
