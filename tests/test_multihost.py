"""Two processes with 2 devices each (gloo on loopback) equal one process with 4."""
import os
import subprocess

import jax
import numpy as np
import training_helpers as helpers

TIMEOUT_S = 600  # generous: the machine may be shared
# 3 steps of 2 micro-batches each, per-host batches, a checkpoint at the end (orbax across
# processes); the parameters and their EMA come back to every host.
RUN = dict(num_steps=3, grad_accum=2, checkpoint_every=3)

WORKER = r"""
import sys
import jax
import numpy as np
import training_helpers as helpers
from dsno_jax import parallel

process_id, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
config = helpers.student_config()
d = config.distributed
d.coordinator_address, d.num_processes, d.process_id = f"127.0.0.1:{port}", 2, process_id
parallel.initialize_distributed(config)
assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
result = helpers.run_student(workdir, helpers.trajectory_pool(config), **RUN,
                             process_index=jax.process_index(), process_count=2)
state = parallel.to_host(result.state, parallel.make_mesh())
if jax.process_index() == 0:
  np.savez(out, *jax.tree_util.tree_leaves((state.params, state.ema_params)))
"""


def launch(tmp_path, process_id, port):
  log = tmp_path / f"process_{process_id}.log"
  code = f"RUN = {RUN!r}\n" + WORKER
  process = subprocess.Popen(
      [helpers.python(), "-c", code, str(process_id), str(port), str(tmp_path / "two_hosts"),
       str(tmp_path / "two_hosts.npz")],
      cwd=helpers.ROOT, env=dict(helpers.subprocess_env(2), PYTHONPATH=os.pathsep.join(
          [helpers.ROOT, os.path.dirname(os.path.abspath(__file__))])),
      stdout=open(log, "w"), stderr=subprocess.STDOUT)
  return process, log


def test_two_processes_of_two_devices_equal_one_process_of_four(tmp_path):
  helpers.use_compilation_cache()
  port = helpers.free_port()
  workers = [launch(tmp_path, i, port) for i in range(2)]
  try:
    config = helpers.student_config()
    one = helpers.run_student(tmp_path / "one_host", helpers.trajectory_pool(config),
                              mesh=helpers.mesh_of(4), **RUN)
    for process, log in workers:
      assert process.wait(timeout=TIMEOUT_S) == 0, open(log).read()[-4000:]
  finally:
    for process, _ in workers:
      if process.poll() is None:
        process.kill()
  want = jax.tree_util.tree_leaves(jax.device_get((one.state.params, one.state.ema_params)))
  two = np.load(tmp_path / "two_hosts.npz")
  assert len(two.files) == len(want) > 20
  worst = max(float(np.abs(two[f"arr_{i}"] - value).max()) for i, value in enumerate(want))
  print(f"largest difference: {worst:.2e}")
  assert worst < 1e-5, worst
  # both saved one checkpoint of the whole state, at the last step
  assert sorted(os.listdir(tmp_path / "two_hosts" / "checkpoints" / "student")) == sorted(
      os.listdir(tmp_path / "one_host" / "checkpoints" / "student")) == ["3", "config.json"]
