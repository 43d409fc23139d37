"""The digits classifier classifies well, and its features go through the FID metric."""
import jax
import numpy as np
import pytest
from sklearn import datasets, model_selection

from dsno_jax.evaluation import FID, classifier

STEPS = 600


@pytest.fixture(scope="module")
def digits():
  """The digits in [-1, 1] at 8x8 and 16x16 (bilinear), split as the data pipeline splits them."""
  data = datasets.load_digits()
  # dsno_jax/data/digits.py's split: stratified, 360 test examples, seed 0.
  train, test = model_selection.train_test_split(
      np.arange(len(data.target)), test_size=360, stratify=data.target, random_state=0)
  x8 = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  x16 = np.asarray(jax.image.resize(x8, (len(x8), 16, 16, 1), "bilinear"))
  return dict(x8=x8, x16=x16, labels=data.target, train=train, test=test)


@pytest.fixture(scope="module")
def params8(digits):
  train = digits["train"]
  return classifier.train_classifier(digits["x8"][train], digits["labels"][train], seed=0,
                                     steps=STEPS)


def test_accuracy_at_8x8(digits, params8):
  test = digits["test"]
  assert classifier.accuracy(params8, digits["x8"][test], digits["labels"][test]) >= 0.95


def test_accuracy_at_16x16(digits):
  train, test = digits["train"], digits["test"]
  params = classifier.train_classifier(digits["x16"][train], digits["labels"][train], seed=1,
                                       steps=STEPS)
  assert classifier.accuracy(params, digits["x16"][test], digits["labels"][test]) >= 0.95
  with pytest.raises(ValueError, match=r"images of shape \(4, 8, 8, 1\)"):
    classifier.classifier_features(params, digits["x8"][:4])


def test_features_through_the_fid_metric(digits, params8):
  x, train, test = digits["x8"], digits["train"], digits["test"]
  features = lambda images: classifier.classifier_features(params8, images)
  assert features(x[:5]).shape == (5, classifier.FEATURE_DIM)
  reference = FID.from_model_output(features=np.asarray(features(x[train]))).statistics()
  fd_digits = FID.with_reference(*reference)

  def fd(images):
    metric = fd_digits.empty()
    for batch in np.array_split(images, 3):
      metric = metric.merge(fd_digits.from_model_output(features=features(batch)))
    return metric.compute()

  rng = np.random.default_rng(0)
  held_out = fd(x[test])
  noise = fd(rng.uniform(-1, 1, size=x[test].shape).astype(np.float32))
  one_class = fd(x[train][digits["labels"][train] == 3])
  # Held-out digits are close to the training digits; noise and a collapsed generator are not.
  assert 0 < held_out < 0.1 * min(noise, one_class)


def test_save_and_load(digits, params8, tmp_path):
  path = classifier.save_classifier(str(tmp_path / "classifier"), params8, image_size=8)
  params, config = classifier.load_classifier(path)
  assert config.image_size == 8 and config.feature_dim == classifier.FEATURE_DIM
  images = digits["x8"][:16]
  np.testing.assert_allclose(classifier.classifier_logits(params, images),
                             classifier.classifier_logits(params8, images), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="image_size=16"):
    classifier.save_classifier(str(tmp_path / "wrong"), params8, image_size=16)


def test_bad_training_input_is_refused(digits):
  x, labels = digits["x8"][:20], digits["labels"][:20]
  with pytest.raises(ValueError, match="labels span"):
    classifier.train_classifier(x, labels + 5, seed=0, steps=1)
  with pytest.raises(ValueError, match=r"labels of shape \(19,\)"):
    classifier.train_classifier(x, labels[:19], seed=0, steps=1)
  with pytest.raises(ValueError, match=r"expected \(N, H, W, C\)"):
    classifier.train_classifier(x[..., 0], labels, seed=0, steps=1)


def test_classifier_seed_not_the_run_seed_fixes_the_classifier(tmp_path):
  """Runs that differ in config.seed train the same FD-digits classifier (so their FD-digits
  compare); eval.classifier_seed alone changes it."""
  from configs import tiny  # noqa: PLC0415
  config = tiny.get_config()
  config.eval.classifier_steps = 3

  def trained(name, seed, classifier_seed):
    config.seed, config.eval.classifier_seed = seed, classifier_seed
    return classifier.ensure_classifier(config, str(tmp_path / name))

  first, other_run, other_classifier = (trained("a", 0, 0), trained("b", 5, 0),
                                        trained("c", 0, 1))
  leaves = lambda params: jax.tree_util.tree_leaves(params)
  for a, b in zip(leaves(first), leaves(other_run)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, c) for a, c in zip(leaves(first), leaves(other_classifier)))
