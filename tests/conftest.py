"""Test set-up, before JAX starts: 8 virtual CPU devices, the XLA:CPU flags of dsno_jax.main."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from dsno_jax import xla_flags  # noqa: E402

xla_flags.add_cpu_flags()  # test what `python -m dsno_jax.main` runs
