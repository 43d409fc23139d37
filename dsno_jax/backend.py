"""What depends on the machine: the XLA:CPU flag, and the formulations the models are built with.

The flag routes XLA:CPU's matmuls and reductions through YNNPACK, which also makes XLA's own
convolution gradients fast on CPUs (benchmarks/README.md, "Figures from the code's
docstrings"). XLA reads XLA_FLAGS once, when JAX creates its first backend, so
`add_cpu_flags()` must run before the first computation (importing jax is fine):
`import dsno_jax` calls it. GPU and TPU processes carry the flag harmlessly. An unknown flag
aborts XLA, so it is added only for the jaxlib versions it was verified with; the user's own
setting of it wins, and DSNO_NO_CPU_XLA_FLAGS=1 turns the whole thing off.

The formulations are chosen here, once, when a model is built, never from the environment
while it is traced: every formulation computes the same function, only its speed differs.
"""
import os
import re
from typing import List, MutableMapping, Optional

from absl import logging

YNN_FUSION_TYPE = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FUSION_TYPE}=dot,reduce",)
VERIFIED_JAXLIB = ((0, 10),)  # (major, minor) versions the flags were measured and tested with
OPT_OUT = "DSNO_NO_CPU_XLA_FLAGS"

TIME_CONV_FORMULATIONS = ("fft", "dft")


def add_cpu_flags(environ: Optional[MutableMapping[str, str]] = None,
                  jaxlib_version: Optional[str] = None, quiet: bool = False) -> List[str]:
  """Appends CPU_FLAGS to environ['XLA_FLAGS'] (default os.environ); returns those added.

  Adds nothing to os.environ once JAX's backends have started (XLA would not read it): a
  warning says so unless `quiet`.
  """
  environ = os.environ if environ is None else environ
  if jaxlib_version is None:
    import jaxlib  # noqa: PLC0415 -- only for its version
    jaxlib_version = jaxlib.__version__
  if environ.get(OPT_OUT, "") not in ("", "0"):
    return []
  if _major_minor(jaxlib_version) not in VERIFIED_JAXLIB:
    logging.info("jaxlib %s: XLA:CPU flags %s not added (verified with %s)", jaxlib_version,
                 CPU_FLAGS, VERIFIED_JAXLIB)
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [f for f in CPU_FLAGS if f.split("=")[0] + "=" not in current]
  if added and environ is os.environ and backends_started():
    if not quiet:
      logging.warning("XLA:CPU flags %s not added: JAX's backends already started", added)
    return []
  if added:
    environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


def backends_started() -> bool:
  """Whether JAX has created its backends (after which XLA_FLAGS is no longer read)."""
  from jax._src import xla_bridge  # noqa: PLC0415
  return xla_bridge.backends_are_initialized()


def time_conv_formulation(platform: Optional[str] = None) -> str:
  """TimeConv's formulation for `platform` (default: JAX's default backend, which this starts).

  "dft" on CPUs, where K-point DFTs as small matmuls beat XLA:CPU's FFT for the few output
  times DSNO uses; "fft" elsewhere, where accelerators have native FFTs.
  """
  if platform is None:
    import jax  # noqa: PLC0415 -- not at import: `import dsno_jax` must not start the backends
    platform = jax.default_backend()
  return "dft" if platform == "cpu" else "fft"


def _major_minor(version: str) -> Optional[tuple]:
  """(major, minor) of a version string such as '0.10.2' or '0.10.2.dev20261101'; None if not."""
  match = re.match(r"(\d+)\.(\d+)", version)
  return (int(match.group(1)), int(match.group(2))) if match else None
