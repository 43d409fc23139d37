"""Mode generate: targets equal a direct ODE solve, resume after SIGKILL, 8 devices equal 1."""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from dsno_jax import diffusion, ode, teachers
from dsno_jax.data import noise as noise_lib
from dsno_jax.data import trajectories
from dsno_jax.teachers import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small generation: 24 examples in 3 shards, batches of 8, 4 DDIM steps, exact teacher.
OVERRIDES = {"teacher.kind": "digits_mixture", "trajectory.num_examples": 24,
             "trajectory.shard_size": 8, "trajectory.batch_size": 8, "trajectory.num_steps": 4}
# Slow enough per batch that a SIGKILL after the first shard lands mid-way.
KILL_OVERRIDES = dict(OVERRIDES, **{"trajectory.num_examples": 96,
                                    "trajectory.num_steps": 8192})
# Float16 targets from differently sized per-device batches: XLA vectorises each batch shape
# its own way, and a last-bit float32 difference can round to the neighbouring float16.
ONE_FLOAT16_STEP = dict(rtol=2 ** -10, atol=1e-6)


def _config(overrides):
  config = tiny.get_config()
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def _read_all(directory):
  """Every example of the dataset, sorted by index, as stacked numpy arrays."""
  source = tfds.builder_from_directory(directory).as_data_source(split="train")
  examples = sorted((source[i] for i in range(len(source))), key=lambda e: int(e["index"]))
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  config = _config(OVERRIDES)
  workdir = str(tmp_path_factory.mktemp("gen"))
  directory = generate.generate(config, workdir)
  return config, workdir, directory


def test_reads_back_every_index_once_and_equals_a_direct_solve(generated):
  config, _, directory = generated
  data = _read_all(directory)
  n, k = 24, len(config.trajectory.save_times)
  np.testing.assert_array_equal(data["index"], np.arange(n))  # each exactly once
  assert "noise" not in data and data["noise_check"].shape == (n, 4)  # format 2: seeded noise
  assert data["targets"].shape == (n, k, 8, 8, 1) and data["targets"].dtype == np.float16
  assert set(np.unique(data["label"])) <= set(range(10)) and len(np.unique(data["label"])) > 2

  # the documented noise and labels of example i (split keys), and the teacher's ODE solve
  keys = [jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), i))
          for i in range(n)]
  noise = np.stack([jax.random.normal(key[0], (8, 8, 1)) for key in keys])
  labels = np.asarray([jax.random.randint(key[1], (), 0, 10) for key in keys])
  np.testing.assert_array_equal(data["noise_check"], trajectories.noise_check(noise))
  np.testing.assert_array_equal(data["label"], labels)
  regenerated, _ = noise_lib.example_inputs(np.arange(n), seed=config.seed,
                                            image_shape=(8, 8, 1), num_classes=10)
  np.testing.assert_array_equal(np.asarray(regenerated), noise)  # bit for bit
  mixture = teachers.digits_mixture(8)
  trajectory = config.trajectory
  solve = jax.jit(lambda z, y: ode.trajectory(
      mixture.denoise, z, trajectory.save_times, solver=trajectory.solver,
      num_steps=trajectory.num_steps, grid=trajectory.grid,
      y=y))
  want = np.asarray(solve(jnp.asarray(noise), jnp.asarray(labels)))
  np.testing.assert_allclose(data["targets"], want, rtol=2 ** -11, atol=1e-5)  # float16
  assert np.abs(want[:, -1]).max() > 0.5  # a real trajectory, not zeros

  meta = trajectories.read_metadata(directory)
  assert meta["save_times"] == list(trajectory.save_times) and meta["num_steps"] == 4
  assert meta["solver"] == "ddim" and meta["grid"] == "uniform_t"
  # one evaluation per grid step (4, plus one for t=0.0625, which shares t=0.25's nearest
  # point); the targets are the steps' own x-hats and z/alpha at t=0
  assert meta["nfe"] == ode.nfe("ddim", 4, "uniform_t", trajectory.save_times) == 5
  assert meta["target_nfe"] == 0
  assert meta["teacher"] == "digits_mixture:image_size=8"
  assert meta["image_shape"] == [8, 8, 1] and meta["num_examples"] == n
  np.testing.assert_allclose(
      meta["logsnrs"], diffusion.logsnr_schedule_cosine(np.asarray(trajectory.save_times)),
      rtol=1e-5)


def test_eight_devices_equal_one(generated, tmp_path):
  config, _, directory = generated
  assert jax.device_count() == 8
  one = generate.generate(config, str(tmp_path), devices=jax.devices()[:1])
  many, single = _read_all(directory), _read_all(one)
  for key in ("noise_check", "label", "index"):
    np.testing.assert_array_equal(many[key], single[key])
  np.testing.assert_allclose(many["targets"], single["targets"], **ONE_FLOAT16_STEP)


def test_complete_dataset_is_kept_and_other_settings_refused(generated):
  config, workdir, directory = generated
  before = {n: os.path.getmtime(os.path.join(directory, n)) for n in os.listdir(directory)}
  assert generate.generate(config, workdir) == directory  # already complete: nothing redone
  other = _config(dict(OVERRIDES, **{"trajectory.num_steps": 8}))
  other.trajectory.dir = directory
  with pytest.raises(ValueError, match="num_steps: on disk 4, now 8"):
    generate.generate(other, "unused")
  assert before == {n: os.path.getmtime(os.path.join(directory, n)) for n in os.listdir(directory)}


def test_batch_size_must_divide_over_devices(tmp_path):
  config = _config(dict(OVERRIDES, **{"trajectory.batch_size": 12}))
  with pytest.raises(ValueError, match="batch_size=12 must be a multiple of the device count 8"):
    generate.generate(config, str(tmp_path))


def test_killed_generation_resumes_without_duplicates_or_gaps(tmp_path):
  killed = str(tmp_path / "killed")
  command = [sys.executable, "-m", "dsno_jax.main", "--config=configs/tiny.py",
             f"--workdir={killed}", "--mode=generate"]
  command += [f"--config.{k}={v}" for k, v in KILL_OVERRIDES.items()]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
  directory = os.path.join(killed, "trajectories")
  first = trajectories.shard_path(directory, 0, 12)
  deadline = time.time() + 240
  try:
    while not os.path.exists(first):
      if process.poll() is not None:
        pytest.fail(f"generate exited early: {process.stderr.read().decode()[-3000:]}")
      if time.time() > deadline:
        pytest.fail("no shard written within 240 s")
      time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait(timeout=60)
  config = _config(KILL_OVERRIDES)
  plan = trajectories.read_plan(directory)
  done = trajectories.existing_shards(directory, plan)
  assert 0 in done and len(done) < 12, f"the kill landed after the end: {sorted(done)}"
  assert not trajectories.is_complete(directory)

  generate.generate(config, killed)  # resumes
  resumed = _read_all(directory)
  straight = _read_all(generate.generate(config, str(tmp_path / "straight")))
  np.testing.assert_array_equal(resumed["index"], np.arange(96))
  for key in straight:
    np.testing.assert_array_equal(resumed[key], straight[key])  # bit for bit
  assert not [n for n in os.listdir(directory) if n.startswith(".")]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_hosts_write_their_own_shards_and_match_one_host(generated, tmp_path):
  """2 processes x 2 CPU devices (gloo): shards 0, 2 from host 0 and 1 from host 1."""
  _, _, directory = generated
  port = _free_port()
  command = [sys.executable, "-m", "dsno_jax.main", "--config=configs/tiny.py",
             f"--workdir={tmp_path}", "--mode=generate"]
  command += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  processes = []
  for process_id in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
    processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
  try:
    errors = [p.communicate(timeout=300)[1].decode() for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, err in zip(processes, errors):
    assert p.returncode == 0, err[-3000:]
  two_hosts, one_host = _read_all(os.path.join(tmp_path, "trajectories")), _read_all(directory)
  for key in ("noise_check", "label", "index"):
    np.testing.assert_array_equal(two_hosts[key], one_host[key])
  np.testing.assert_allclose(two_hosts["targets"], one_host["targets"], **ONE_FLOAT16_STEP)
  assert "this host: 4 batches of 4" in errors[0] and "this host: 2 batches of 4" in errors[1]
  assert "ddim on 4 uniform_t steps, 5 denoiser evaluations per trajectory" in errors[0]


@pytest.mark.parametrize("field", ["batch_size", "num_examples", "shard_size", "num_steps"])
def test_non_positive_counts_are_refused_naming_the_field(field, tmp_path):
  config = _config(dict(OVERRIDES, **{f"trajectory.{field}": 0}))
  with pytest.raises(ValueError, match=rf"trajectory\.{field}=0; expected a positive integer"):
    generate.generate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "trajectories")
