"""Test set-up, before JAX starts: 8 virtual CPU devices, then dsno_jax's XLA:CPU flag."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import dsno_jax  # noqa: E402,F401 -- adds the XLA:CPU flag, as every user of the package gets

try:  # torchvision (the reference of some tests) crashes when loaded after TensorFlow here
  import torchvision.models  # noqa: E402,F401
except ImportError:
  pass


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a long multi-process test; `-m 'not slow'` skips it")
