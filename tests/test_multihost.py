"""SPEC section 8: two processes with 2 devices each (gloo on loopback) equal one process with 4."""
import os
import subprocess

import numpy as np
import training_helpers as helpers

TIMEOUT_S = 600  # generous: the machine may be shared

# Trains the tiny student 3 steps (2 micro-batches each) on per-host synthetic batches, then
# exports the EMA student (a multi-process orbax restore) and saves the final parameters.
WORKER = r"""
import sys
import jax
import numpy as np
process_id, num_processes, port, workdir, out = sys.argv[1:]
process_id, num_processes = int(process_id), int(num_processes)
from configs import tiny
from dsno_jax import diffusion, model_io
from dsno_jax.training import checkpoints, loop, sharding
import training_helpers as helpers

config = tiny.get_config()
s = config.train
s.init_from_teacher, s.batch_size, s.learning_rate, s.warmup_steps = False, 8, 2e-3, 2
s.num_steps, s.grad_accum, s.checkpoint_every, s.log_every = 3, 2, 3, 1
if num_processes > 1:
  d = config.distributed
  d.coordinator_address, d.num_processes, d.process_id = f"127.0.0.1:{port}", num_processes, process_id
sharding.initialize_distributed(config)
assert jax.process_count() == num_processes and jax.device_count() == 4, jax.devices()
pool = helpers.trajectory_pool(config)
objective = loop.student_objective(config, diffusion.save_logsnrs(config))
batches = lambda start: helpers.pool_batches(
    pool, global_batch_size=8, seed=config.seed, start_step=start,
    process_index=jax.process_index(), process_count=jax.process_count())
result = loop.train(config, workdir, objective, batches)
params = checkpoints.to_host(result.state.params, sharding.make_mesh())
exported, _, _ = model_io.load_model(checkpoints.export_student(config, workdir))
if jax.process_index() == 0:
  np.savez(out, *jax.tree_util.tree_leaves(params),
           *[x for x in jax.tree_util.tree_leaves(exported)])
"""


def launch(tmp_path, name, process_id, num_processes, port, devices):
  workdir, out = tmp_path / name, tmp_path / f"{name}.npz"
  log = open(tmp_path / f"{name}_{process_id}.log", "w")
  process = subprocess.Popen(
      [helpers.python(), "-c", WORKER, str(process_id), str(num_processes), str(port),
       str(workdir), str(out)],
      cwd=helpers.ROOT, env=dict(helpers.subprocess_env(devices),
                                 PYTHONPATH=os.pathsep.join([helpers.ROOT, os.path.dirname(
                                     os.path.abspath(__file__))])),
      stdout=log, stderr=subprocess.STDOUT)
  return process, tmp_path / f"{name}_{process_id}.log", out


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path):
  port = helpers.free_port()
  runs = [launch(tmp_path, "two_hosts", i, 2, port, 2) for i in range(2)]
  runs.append(launch(tmp_path, "one_host", 0, 1, port, 4))
  try:
    for process, log, _ in runs:
      assert process.wait(timeout=TIMEOUT_S) == 0, open(log).read()[-4000:]
  finally:
    for process, _, _ in runs:
      if process.poll() is None:
        process.kill()
  two, one = np.load(runs[0][2]), np.load(runs[2][2])
  assert len(two.files) == len(one.files) > 20
  for name in one.files:
    np.testing.assert_allclose(two[name], one[name], atol=1e-5, rtol=0, err_msg=name)
