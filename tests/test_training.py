"""Training: the losses fall, 8 devices equal 1, a NaN stops the run, bad input fails."""
import os

import flax
import jax
import numpy as np
import pytest
import training_helpers as helpers

from dsno_jax import diffusion, export, models
from dsno_jax.data import digits, images
from dsno_jax.models import io as model_io
from dsno_jax.training import loop, losses, objectives, runs, state

helpers.use_compilation_cache()


student_config, mesh_of = helpers.student_config, helpers.mesh_of


def run_student(workdir, num_steps, num_devices, pool, **kwargs):
  return helpers.run_student(workdir, pool, num_steps=num_steps, mesh=mesh_of(num_devices),
                             **kwargs)


@pytest.fixture(scope="module")
def pool():
  return helpers.trajectory_pool(student_config())


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


@pytest.fixture(scope="module")
def thirty_step_run(tmp_path_factory, pool):
  return run_student(tmp_path_factory.mktemp("thirty"), 30, 1, pool, checkpoint_every=10)


def test_student_loss_falls(thirty_step_run):
  loss = np.array([h["loss"] for h in thirty_step_run.history])
  assert len(loss) == 30 and np.all(np.isfinite(loss))
  assert loss[-5:].mean() < 0.6 * loss[:3].mean(), loss
  assert {f"d_{k}" for k in range(4)} <= set(thirty_step_run.history[-1])


def test_sigterm_saves_stops_and_the_resumed_run_ends_as_the_uninterrupted_one(
    tmp_path, pool, one_device_run):
  stopped = run_student(tmp_path, 3, 1, pool, sigterm_at_step=1)
  step = int(stopped.state.step)
  assert stopped.preempted and 1 <= step < 3, step
  directory = tmp_path / "checkpoints" / "student"
  assert max(int(p) for p in os.listdir(directory) if p.isdigit()) == step  # saved on SIGTERM
  resumed = run_student(tmp_path, 3, 1, pool)
  assert not resumed.preempted and resumed.history[0]["step"] == step + 1
  _, uninterrupted = one_device_run
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(uninterrupted.state)),
                  jax.tree_util.tree_leaves(jax.device_get(resumed.state))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_teacher_loss_falls(tmp_path):
  config = helpers.one_level_config()
  t = config.teacher.train
  t.num_steps, t.batch_size, t.learning_rate, t.warmup_steps, t.log_every = 40, 8, 2e-3, 2, 1
  t.checkpoint_every, t.loss_weighting, config.teacher.mean_type = 40, "snr_trunc", "eps"
  source = images.InMemorySource(*digits.digit_images(8))
  batches = lambda start: images.batch_iterator(source, global_batch_size=8, seed=0,
                                                start_step=start)
  result = loop.train(config, str(tmp_path), objectives.teacher_objective(config), batches,
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
  objective = objectives.student_objective(config, diffusion.save_logsnrs(config))
  with pytest.raises(ValueError, match="12 is not divisible by the 8 devices"):
    loop.train(config, str(tmp_path), objective, None, mesh=mesh_of(8))


def test_missing_trajectory_dataset(tmp_path):
  with pytest.raises(FileNotFoundError, match="run --mode=generate"):
    runs.train_student(student_config(), str(tmp_path))


def test_checkpoint_of_another_config(one_device_run, pool):
  workdir, _ = one_device_run
  config = student_config(num_steps=6)
  config.model.emb_ch = 32
  objective = objectives.student_objective(config, diffusion.save_logsnrs(config))
  with pytest.raises(ValueError,
                     match=r"(?s)different config.*model.emb_ch: checkpoint 64 vs now 32"):
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
  s = student_config(learning_rate=1.0, warmup_steps=10, warmup_init=0.1,
                     milestones=(20, 30)).train
  schedule = state.learning_rate_schedule(s)
  got = [float(schedule(i)) for i in (0, 5, 10, 19, 20, 29, 30, 100)]
  np.testing.assert_allclose(got, [0.1, 0.55, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25], rtol=1e-6)


def test_export_student_writes_the_ema_params(one_device_run):
  workdir, result = one_device_run
  path = export.export_student(student_config(), str(workdir))
  params, config, role = model_io.load_model(path)
  assert role == "student" and config.model.ch == 32
  for a, b in zip(jax.tree_util.tree_leaves(params),
                  jax.tree_util.tree_leaves(jax.device_get(result.state.ema_params))):
    np.testing.assert_array_equal(a, b)
  other = student_config()
  other.model.ch_mult = (1, 1)
  with pytest.raises(ValueError, match=r"(?s)different config.*model.ch_mult"):
    export.export_student(other, str(workdir))


def test_train_student_reads_the_trajectory_dataset_and_starts_from_the_teacher(tmp_path, pool):
  config = student_config(num_steps=2, fsdp=True, init_from_teacher=True)
  config.trajectory.num_examples, config.trajectory.shard_size = 16, 8
  helpers.write_pool_dataset(config, str(tmp_path / "trajectories"), pool)
  teacher = models.init_teacher(config, jax.random.PRNGKey(5))
  model_io.save_model(str(tmp_path / "teacher"), jax.device_get(teacher), config, "teacher")

  objective = objectives.student_objective(config, diffusion.save_logsnrs(config),
                                     runs.teacher_params_loader(config, str(tmp_path)))
  student = flax.traverse_util.flatten_dict(objective.start_params(jax.random.PRNGKey(0)))
  for path, value in flax.traverse_util.flatten_dict(jax.device_get(teacher)).items():
    np.testing.assert_array_equal(student[path], value, err_msg="/".join(path))
  result = runs.train_student(config, str(tmp_path))
  assert [h["step"] for h in result.history] == [1, 2]
  assert np.isfinite([h["loss"] for h in result.history]).all()
  config.trajectory.save_times = (0.5, 0.25, 0.1, 0.0)
  with pytest.raises(ValueError, match="were saved at log-SNRs"):
    runs.train_student(config, str(tmp_path))


def test_ahead_of_time_compiles_each_program_once_and_raises_its_errors_at_get():
  from dsno_jax import parallel
  calls = []

  def compile_twice(x):
    calls.append(x.shape)
    return parallel.lower_and_compile(jax.jit(lambda a: 2 * a), x)

  spec = jax.ShapeDtypeStruct((3,), np.float32)
  ahead = parallel.AheadOfTime()
  try:
    ahead.start("double", compile_twice, spec)
    ahead.start("double", compile_twice, spec)  # begun already: no second compilation
    program = ahead.get("double", compile_twice, spec)
    np.testing.assert_array_equal(program(np.arange(3, dtype=np.float32)), [0.0, 2.0, 4.0])
    assert calls == [(3,)]
    ahead.start("broken", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
      ahead.get("broken", lambda: 1 / 0)
  finally:
    ahead.close()


def test_the_loop_compiles_each_program_once(tmp_path, pool, monkeypatch):
  from dsno_jax import parallel
  compile_for, programs = parallel.lower_and_compile, []

  def counting(jitted, *args):
    programs.append(jitted)
    return compile_for(jitted, *args)

  monkeypatch.setattr(parallel, "lower_and_compile", counting)
  result = helpers.run_student(tmp_path, pool, num_steps=6, mesh=mesh_of(1), checkpoint_every=3,
                               sample_every=3)
  assert [h["step"] for h in result.history] == list(range(1, 7))
  names = [p.__name__ for p in programs]
  # the step, the check before each of the 2 saves, the sampler of each of the 2 grids
  assert names.count("train_step") == names.count("check") == 1, names
  assert len(set(map(id, programs))) == len(programs), names
