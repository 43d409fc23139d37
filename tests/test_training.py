"""SPEC sections 5, 8, 9: the losses fall, 8 devices equal 1, a NaN stops the run, bad input fails."""
import os

import jax
import numpy as np
import pytest

from configs import tiny
from dsno_jax import diffusion
from dsno_jax.training import checkpoints, loop, losses
import training_helpers as helpers

helpers.use_compilation_cache()


def student_config(**train):
  config = tiny.get_config()
  s = config.train
  s.init_from_teacher, s.batch_size, s.learning_rate, s.warmup_steps = False, 8, 2e-3, 2
  s.ema_decay, s.log_every, s.checkpoint_every = 0.9, 1, 3
  for name, value in train.items():
    s[name] = value
  return config


def mesh_of(num_devices):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))


def run_student(workdir, num_steps, num_devices, pool, nan_at_step=None, **train):
  config = student_config(num_steps=num_steps, **train)
  objective = loop.student_objective(config, diffusion.save_logsnrs(config))
  batches = lambda start: helpers.pool_batches(pool, global_batch_size=8, seed=config.seed,
                                               start_step=start, nan_at_step=nan_at_step)
  return loop.train(config, str(workdir), objective, batches, mesh=mesh_of(num_devices))


@pytest.fixture(scope="module")
def pool():
  return helpers.trajectory_pool(tiny.get_config())


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, pool):
  workdir = tmp_path_factory.mktemp("one_device")
  return workdir, run_student(workdir, 3, 1, pool)


def test_eight_devices_equal_one_device(tmp_path, pool, one_device_run):
  _, one = one_device_run
  eight = run_student(tmp_path, 3, 8, pool, fsdp=True)
  # FSDP really shards something, and the answers agree anyway
  specs = [x.sharding.spec for x in jax.tree_util.tree_leaves(eight.state.params)]
  assert any("data" in tuple(s) for s in specs)
  assert int(eight.state.step) == int(one.state.step) == 3
  for name in ("params", "ema_params", "opt_state"):
    a = jax.tree_util.tree_leaves(jax.device_get(getattr(one.state, name)))
    b = jax.tree_util.tree_leaves(jax.device_get(getattr(eight.state, name)))
    for x, y in zip(a, b):
      np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=name)
  moved = max(float(np.abs(x - y).max()) for x, y in zip(
      jax.tree_util.tree_leaves(jax.device_get(one.state.params)),
      jax.tree_util.tree_leaves(jax.device_get(one.state.ema_params))))
  assert moved > 1e-4  # the runs did train


def test_student_loss_falls(tmp_path, pool):
  result = run_student(tmp_path, 30, 1, pool, checkpoint_every=10)
  loss = np.array([h["loss"] for h in result.history])
  assert len(loss) == 30 and np.all(np.isfinite(loss))
  assert loss[-5:].mean() < 0.6 * loss[:3].mean(), loss
  assert {f"d_{k}" for k in range(4)} <= set(result.history[-1])
  assert sorted(os.listdir(tmp_path / "checkpoints" / "student")) == ["10", "20", "30", "config.json"]


def test_teacher_loss_falls(tmp_path):
  from dsno_jax.data import digits, images
  config = tiny.get_config()
  t = config.teacher.train
  t.num_steps, t.batch_size, t.learning_rate, t.warmup_steps, t.log_every = 40, 8, 2e-3, 2, 1
  t.checkpoint_every, t.loss_weighting, config.teacher.mean_type = 40, "snr_trunc", "eps"
  source = images.InMemorySource(*digits.digit_images(8))
  batches = lambda start: images.batch_iterator(source, global_batch_size=8, seed=0,
                                                start_step=start)
  result = loop.train(config, str(tmp_path), loop.teacher_objective(config), batches,
                      mesh=mesh_of(1))
  loss = np.array([h["loss"] for h in result.history])
  assert np.all(np.isfinite(loss))
  # per-batch losses are noisy (random times): compare medians of the first and last tens
  assert np.median(loss[-10:]) < 0.5 * np.median(loss[:10]), loss


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, pool):
  with pytest.raises(FloatingPointError, match=r"nan at step 5.*last good checkpoint \(step 3"):
    run_student(tmp_path, 8, 1, pool, nan_at_step=4)
  directory = tmp_path / "checkpoints" / "student"
  assert sorted(p for p in os.listdir(directory) if p.isdigit()) == ["3"]


def test_batch_not_divisible_by_devices(tmp_path, pool):
  config = student_config(batch_size=12)
  objective = loop.student_objective(config, diffusion.save_logsnrs(config))
  with pytest.raises(ValueError, match="12 is not divisible by the 8 devices"):
    loop.train(config, str(tmp_path), objective, None, mesh=mesh_of(8))


def test_missing_trajectory_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="run --mode=generate"):
    loop.train_student(student_config(), str(tmp_path))


def test_checkpoint_of_another_config(one_device_run, pool):
  workdir, _ = one_device_run
  config = student_config(num_steps=6)
  config.model.emb_ch = 32
  objective = loop.student_objective(config, diffusion.save_logsnrs(config))
  with pytest.raises(ValueError, match=r"(?s)different config.*model.emb_ch: checkpoint 64 vs now 32"):
    loop.train(config, str(workdir), objective, None, mesh=mesh_of(1))


def test_unavailable_and_unknown_losses():
  with pytest.raises(FileNotFoundError, match="'vgg' needs converted VGG16 weights"):
    losses.get_distance("vgg")  # train.perceptual_weights unset
  with pytest.raises(ValueError, match="expected one of"):
    losses.get_distance("l3")
  with pytest.raises(ValueError, match="loss_weighting='snr'"):
    losses.teacher_weight(0.0, "snr")


def test_student_loss_weights_every_time():
  prediction = np.zeros((2, 3, 4, 4, 1), np.float32)
  targets = np.ones_like(prediction) * np.array([1.0, 2.0, 3.0])[None, :, None, None, None]
  logsnr = np.array([-2.0, 4.0, 10.0], np.float32)
  loss, d = losses.student_loss(prediction, targets, logsnr, losses.l1_distance, "snr")
  np.testing.assert_allclose(d, [1.0, 2.0, 3.0])
  w = np.clip(np.exp(logsnr / 2), 1, 1e4)
  np.testing.assert_allclose(loss, np.mean(w * [1.0, 2.0, 3.0]), rtol=1e-6)
  loss, d = losses.student_loss(prediction, targets, logsnr, losses.l2_distance, "uniform")
  np.testing.assert_allclose(d, [1.0, 4.0, 9.0])
  np.testing.assert_allclose(loss, 14.0 / 3, rtol=1e-6)


def test_learning_rate_schedule():
  from dsno_jax.training import state
  s = student_config(learning_rate=1.0, warmup_steps=10, warmup_init=0.1,
                     milestones=(20, 30)).train
  schedule = state.learning_rate_schedule(s)
  got = [float(schedule(i)) for i in (0, 5, 10, 19, 20, 29, 30, 100)]
  np.testing.assert_allclose(got, [0.1, 0.55, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25], rtol=1e-6)


def test_export_student_writes_the_ema_params(one_device_run):
  from dsno_jax import model_io
  workdir, result = one_device_run
  path = checkpoints.export_student(student_config(), str(workdir))
  params, config, role = model_io.load_model(path)
  assert role == "student" and config.model.ch == 32
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(jax.device_get(result.state.ema_params))):
    np.testing.assert_array_equal(a, b)
