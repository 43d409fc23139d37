"""launch/: dry runs print the right commands; the local launcher really runs a 2-host collective."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
sys.path.insert(0, LAUNCH)
import local  # noqa: E402  (launch/local.py)
import slurm_hosts  # noqa: E402


def run(cmd, env=None):
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                       env={**os.environ, **(env or {})})
  return out.returncode, out.stdout, out.stderr


def test_tpu_pod_dry_run_for_a_v4_32_slice():
  code, out, err = run(["bash", "launch/tpu_pod.sh", "--name", "dsno-v4", "--zone", "us-central2-b",
                        "--accelerator", "v4-32", "--bucket", "gs://my-bucket/", "--config",
                        "configs/imagenet64.py", "--mode", "train", "--spot", "--dry-run", "--",
                        "--config.train.batch_size=2048"])
  assert code == 0, err
  lines = out.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create dsno-v4 --zone=us-central2-b "
                             "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot")
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp --recurse")
  assert "--worker=all" in lines[1]
  install, job = lines[2], lines[3]
  assert "--worker=all" in install and "pip\\ install\\ -e\\ ~/dsno_jax" in install
  assert "jax\\[tpu\\]" in install
  assert job.startswith("gcloud compute tpus tpu-vm ssh dsno-v4 --zone=us-central2-b --worker=all")
  for part in ("python\\ -m\\ dsno_jax.main", "--config=configs/imagenet64.py",
               "--workdir=gs://my-bucket/dsno_jax/imagenet64", "--mode=train",
               "--config.data.data_dir=gs://my-bucket/tensorflow_datasets",
               "--config.train.batch_size=2048"):
    assert part in job, (part, job)


def test_tpu_pod_refuses_a_local_bucket():
  code, _, err = run(["bash", "launch/tpu_pod.sh", "--name", "n", "--zone", "z", "--bucket",
                      "/tmp/x", "--dry-run"])
  assert code == 2 and "'/tmp/x' must be a GCS path" in err


def test_slurm_dry_run_for_2_nodes_of_8_gpus():
  env = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "8",
         "PATH": "/usr/bin:/bin"}  # no scontrol on PATH: the nodelist is expanded in python
  code, out, err = run(["bash", "launch/slurm_gpu.sh", "--dry-run", "--workdir", "/shared/r",
                        "--mode", "train", "--", "--config.train.batch_size=2048"],
                       env={**env, "PATH": os.environ["PATH"]})
  assert code == 0, err
  lines = out.strip().splitlines()
  assert len(lines) == 2
  for rank, (line, host) in enumerate(zip(lines, ["gpu07", "gpu08"])):
    assert line.startswith(f"host={host} JAX_COORDINATOR_ADDRESS=gpu07:12355 JAX_NUM_PROCESSES=2 "
                           f"JAX_PROCESS_ID={rank} CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 ")
    assert line.rstrip().endswith("python -m dsno_jax.main --config=configs/imagenet64.py "
                         "--workdir=/shared/r --mode=train --config.train.batch_size=2048")


def test_slurm_needs_a_workdir():
  code, _, err = run(["bash", "launch/slurm_gpu.sh", "--dry-run"], env={"SLURM_JOB_NODELIST": "a"})
  assert code == 2 and "--workdir is required" in err


def test_slurm_nodelist_expansion():
  assert slurm_hosts.expand("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07",
                                                         "login1"]
  assert slurm_hosts.expand("a[9-10]") == ["a9", "a10"]


def test_local_dry_run_prints_one_command_per_process(capsys):
  assert local.main(["--num_processes", "3", "--devices_per_process", "4", "--dry-run", "--",
                     "python", "-c", "pass"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3
  for rank, line in enumerate(lines):
    assert f"JAX_PROCESS_ID={rank}" in line and "JAX_NUM_PROCESSES=3" in line
    assert "--xla_force_host_platform_device_count=4" in line
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in line
    assert line.endswith("python -c pass")


SUM_SCRIPT = """
import os
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                           int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
local = np.arange(2, dtype=np.float32) + 10 * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print("TOTAL", jax.process_count(), jax.device_count(), float(total))
"""


def test_local_launcher_runs_a_cross_process_sum(capfd):
  codes = local.launch([sys.executable, "-c", SUM_SCRIPT], num_processes=2,
                       devices_per_process=1, timeout=120)
  out = capfd.readouterr().out
  assert codes == [0, 0], out
  # process 0 holds [0, 1], process 1 holds [10, 11]
  assert out.count("TOTAL 2 2 22.0") == 2, out
