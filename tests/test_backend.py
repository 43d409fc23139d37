"""dsno_jax.backend: the XLA:CPU flag (added to XLA_FLAGS, and when not) and the formulations."""
import os
import subprocess
import sys

import jaxlib
import pytest

from dsno_jax import backend

FLAG = backend.CPU_FLAGS[0]
NAME = FLAG.split("=")[0]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERIFIED = backend._major_minor(jaxlib.__version__) in backend.VERIFIED_JAXLIB


def test_appends_to_the_users_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert backend.add_cpu_flags(env, "0.10.2") == [FLAG]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert backend.add_cpu_flags(env, "0.10.2") == []  # once only
  assert env["XLA_FLAGS"].count(NAME) == 1


def test_sets_the_flags_when_there_were_none():
  env = {}
  assert backend.add_cpu_flags(env, "0.10.0") == [FLAG]
  assert env == {"XLA_FLAGS": FLAG}


def test_the_users_own_value_wins():
  env = {"XLA_FLAGS": f"{NAME}=dot"}
  assert backend.add_cpu_flags(env, "0.10.2") == []
  assert env["XLA_FLAGS"] == f"{NAME}=dot"


def test_opt_out_and_unverified_jaxlib_leave_the_flags_alone():
  for env, version in (({backend.OPT_OUT: "1"}, "0.10.2"), ({}, "0.11.2"), ({}, "0.4.30")):
    before = dict(env)
    assert backend.add_cpu_flags(env, version) == []
    assert env == before
  env = {backend.OPT_OUT: "0"}  # "0" does not opt out
  assert backend.add_cpu_flags(env, "0.10.2") == [FLAG]


def test_time_conv_formulation_by_platform():
  assert backend.time_conv_formulation("cpu") == "dft"
  assert backend.time_conv_formulation("gpu") == "fft"
  assert backend.time_conv_formulation("tpu") == "fft"
  assert backend.time_conv_formulation() == "dft"  # the tests run on the CPU
  assert set(backend.TIME_CONV_FORMULATIONS) == {"fft", "dft"}


def xla_flags_after(script: str, xla_flags: str, **env) -> str:
  """XLA_FLAGS as a fresh Python process sees it after running `script` (which imports
  dsno_jax); the process's last line of output."""
  environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", backend.OPT_OUT)}
  environ.update(XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **env)
  script += "\nimport os\nprint(os.environ['XLA_FLAGS'])"
  done = subprocess.run([sys.executable, "-c", script], env=environ, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip().splitlines()[-1]


DEVICES = "--xla_force_host_platform_device_count=2"


@pytest.mark.skipif(not VERIFIED, reason=f"jaxlib {jaxlib.__version__} is not verified")
def test_importing_dsno_jax_adds_the_flag_before_jax_starts():
  # importing jax first is fine: the backends start at the first computation
  script = "import jax\nimport dsno_jax.models\nassert jax.device_count() == 2"
  assert xla_flags_after(script, DEVICES) == f"{DEVICES} {FLAG}"


@pytest.mark.skipif(not VERIFIED, reason=f"jaxlib {jaxlib.__version__} is not verified")
def test_importing_dsno_jax_after_jax_started_adds_nothing():
  script = ("import jax\njax.numpy.ones(2).block_until_ready()\nimport dsno_jax\n"
            "from dsno_jax import backend\nassert backend.backends_started()\n"
            "assert backend.add_cpu_flags(quiet=True) == []")
  assert xla_flags_after(script, DEVICES) == DEVICES


def test_importing_dsno_jax_keeps_the_users_own_value():
  for value in (f"{NAME}=reduce", f"{DEVICES} {NAME}=dot"):
    assert xla_flags_after("import dsno_jax", value) == value


def test_importing_dsno_jax_with_the_opt_out_adds_nothing():
  assert xla_flags_after("import dsno_jax", DEVICES, **{backend.OPT_OUT: "1"}) == DEVICES
