"""A job on a pod, simulated as separate hosts on this machine (tests/pods.py): each host has its
own hostname, pid space, HOME and disk, and shares only loopback (the coordinator, the Cloud
Storage emulator) with the others. The job survives a hard kill of every host and a relaunch on
other hosts, stops every stage on SIGTERM with exit status 75 and resumes to the uninterrupted
run's results, keeps each host's copy of the data within `data.cache_gb`, and stops every host
when one fails."""

import pytest
import gcs_helpers
from gcs_helpers import BUCKET, emulator, teacher  # noqa: F401  (fixtures)
import pods
import training_helpers as helpers

from dsno_jax import lock, modes, storage
from dsno_jax.models import io as model_io
from dsno_jax.workdir import Workdir

_UNAVAILABLE = pods.unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_UNAVAILABLE), reason=str(_UNAVAILABLE))]

TIMEOUT_S = 600  # generous: the machine may be shared
# Each host's bound on its local copy of the trajectories: about 60% of the tiny data set (its
# ArrayRecord shards take about 0.53 MB in the bucket), so no host may copy all of it, while
# hosts that own half of the shards each still fit.
CACHE_GB = 3.2e-4
# Fewer steps than the Cloud Storage test: a kill after the first checkpoint (step 4) still
# lands before the last.
FLAGS = {"data.cache_gb": CACHE_GB, "train.num_steps": 24}
# A failing host must bring every other host down within this (a hang never ends by itself).
FAILURE_EXIT_S = 120

INJECTED = "injected failure: 503 Service Unavailable"
# Host 1 of the failure test: the pipeline, with every trajectory shard write of this host
# failing as a Cloud Storage 503 would, while host 0 writes its shards and waits for the rest.
FAILING_HOST = r"""
import runpy
import sys
from dsno_jax.data import trajectories

def write_shard(directory, plan, shard, *args, **kwargs):
  raise OSError(f"injected failure: 503 Service Unavailable writing shard {shard}")

trajectories.write_shard = write_shard
sys.argv = ["dsno_jax.main"] + sys.argv[1:]
runpy.run_module("dsno_jax.main", run_name="__main__", alter_sys=True)
"""


def boot(tmp_path, names, workdir, teacher_path, job, program=(), **flags):
  """Hosts `names` (processes 0, 1, ...) of job `job` running the pipeline on `workdir`."""
  port = helpers.free_port()
  main_flags = gcs_helpers.pipeline_flags(workdir, teacher_path, **flags)
  hosts = []
  for process_id, name in enumerate(names):
    argv = [*(program if process_id == 1 and program else
              [helpers.python(), "-m", "dsno_jax.main"]), *main_flags]
    hosts.append(pods.start(name, str(tmp_path / name), argv,
                            {**gcs_helpers.child_env(1), lock.JOB_ENV: job},
                            process_id=process_id, num_processes=len(names), port=port))
  return hosts


def finish(hosts, status=0):
  """Every host exits with `status`; a host still running after the others is killed."""
  try:
    for host in hosts:
      assert host.wait(TIMEOUT_S) == status, f"{host.name}:\n{host.output()[-5000:]}"
  finally:
    for host in hosts:
      host.kill()


def test_each_host_has_its_own_name_and_pid_space_and_they_form_one_job(tmp_path):
  code = ("import os, socket, jax, ml_collections\nfrom dsno_jax import parallel\n"
          "from jax.experimental import multihost_utils\n"
          "parallel.initialize_distributed(ml_collections.ConfigDict())\n"
          "names = multihost_utils.process_allgather(jax.numpy.asarray(\n"
          "    [ord(c) for c in socket.gethostname()]))\n"
          "print('hosts', [''.join(map(chr, n)) for n in names.tolist()], 'parent', os.getppid(),\n"
          "      'home', os.environ['HOME'])\n")
  port = helpers.free_port()
  hosts = [pods.start(name, str(tmp_path / name), [helpers.python(), "-c", code],
                      helpers.subprocess_env(1), process_id=i, num_processes=2, port=port)
           for i, name in enumerate(["hostA", "hostB"])]
  finish(hosts)
  for host in hosts:
    line = [l for l in host.output().splitlines() if l.startswith("hosts")]
    # the parent: the host's init, pid 1 of its own pid space
    assert line == [f"hosts ['hostA', 'hostB'] parent 1 home {host.home}"], host.output()[-3000:]


def test_a_pod_job_survives_a_hard_kill_a_move_to_other_hosts_and_sigterm_in_evaluation(
    emulator, teacher, tmp_path):
  straight, run = f"gs://{BUCKET}/pod_straight", f"gs://{BUCKET}/pod"
  # The reference: the same job on two hosts, never interrupted (it fills the compilation cache).
  reference = boot(tmp_path, ["hostS0", "hostS1"], straight, teacher, "straight", **FLAGS)
  finish(reference)

  first = boot(tmp_path, ["hostA", "hostB"], run, teacher, "job1", **FLAGS)
  try:
    pods.wait_for(lambda: gcs_helpers.student_steps("pod"), first, TIMEOUT_S,
                  "the first student checkpoint")
  finally:
    for host in first:  # both VMs reset mid-training
      host.kill()
  steps = gcs_helpers.student_steps("pod")
  assert steps and steps[-1] < FLAGS["train.num_steps"], steps
  assert storage.exists(Workdir(run).lock)  # left behind by hostA, which never released it

  # The slice recreated: other hostnames, empty disks; only the bucket and the job survive.
  second = boot(tmp_path, ["hostC", "hostD"], run, teacher, "job1", **FLAGS)
  try:
    pods.wait_for(lambda: "pipeline: running evaluate" in second[0].output(), second, TIMEOUT_S,
                  "the evaluate stage")
    for host in second:
      host.terminate()
    finish(second, modes.PREEMPTED_EXIT_STATUS)
  finally:
    for host in second:
      host.kill()
  log = second[0].output()
  assert "resuming at step" in log, log[-5000:]
  assert model_io.is_export(Workdir(run).student_export)
  assert not storage.exists(Workdir(run).results)  # stopped inside evaluate

  third = boot(tmp_path, ["hostE", "hostF"], run, teacher, "job1", **FLAGS)
  finish(third)
  log = third[0].output()
  assert "pipeline: sample is done, skipping" in log and "running evaluate" in log, log[-5000:]
  gcs_helpers.assert_same_results(straight, run)

  data_bytes = gcs_helpers.object_bytes("pod/trajectories/")
  bound = CACHE_GB * 1e9
  assert data_bytes > bound, (data_bytes, bound)  # the bound is below the data set
  print(f"trajectories in the bucket: {data_bytes} bytes; each host's bound {bound:.0f} bytes")
  for host in reference + first + second + third:
    local = {part: pods.disk_use(getattr(host, part)) for part in ("home", "cache", "tmp")}
    copied = sum(pods.disk_use(getattr(host, part), "trajectories", ".array_record")
                 for part in ("home", "cache", "tmp"))
    print(f"{host.name}: trajectory files {copied} bytes; home {local['home']}, cache "
          f"{local['cache']}, tmp {local['tmp']} bytes")
    assert copied <= bound, (host.name, copied, bound)


def test_one_failing_host_stops_every_host(emulator, teacher, tmp_path):
  hosts = boot(tmp_path, ["hostG", "hostH"], f"gs://{BUCKET}/pod_failure", teacher, "job2",
               program=[helpers.python(), "-c", FAILING_HOST])
  try:
    pods.wait_for(lambda: INJECTED in hosts[1].output(), hosts, TIMEOUT_S, "hostH's failure")
    ended = pods.exits(hosts, FAILURE_EXIT_S)
  finally:
    for host in hosts:
      host.kill()
  print("from hostH's failure to each host's exit: " + ", ".join(
      f"{host.name} {seconds:.1f} s (status {status})"
      for host, (status, seconds) in zip(hosts, ended)))
  for host, (status, _) in zip(hosts, ended):
    assert status not in (0, None), (host.name, status, host.output()[-5000:])  # None: hung
    assert INJECTED in host.output(), (host.name, host.output()[-5000:])
