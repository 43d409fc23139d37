"""XLA:CPU flags that speed the network up on CPUs, added to XLA_FLAGS before JAX starts.

XLA reads XLA_FLAGS once, when JAX creates its first backend, so `add_cpu_flags()` must run
before the first computation (importing jax is fine). The flags only change XLA:CPU; GPU and TPU
processes carry them harmlessly. They route matmuls and reductions through YNNPACK, which also
makes XLA's convolution kernel gradient ten times faster on the 2-core CPU here (1020 -> 104
ms forward+backward for 3x3, 32x32, 64->64 at batch 32; benchmarks/README.md). An unknown flag
aborts XLA, so they are added only for the jaxlib versions they were verified with; the
user's own setting of a flag wins, and DSNO_NO_CPU_XLA_FLAGS=1 turns the whole thing off.
"""
import os
import re
from typing import List, MutableMapping, Optional

from absl import logging

YNN_FUSION_TYPE = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FUSION_TYPE}=dot,reduce",)
VERIFIED_JAXLIB = ((0, 10),)  # (major, minor) versions the flags were measured and tested with
OPT_OUT = "DSNO_NO_CPU_XLA_FLAGS"


def add_cpu_flags(environ: Optional[MutableMapping[str, str]] = None,
                  jaxlib_version: Optional[str] = None) -> List[str]:
  """Appends CPU_FLAGS to environ['XLA_FLAGS'] (default os.environ); returns those added."""
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
  if added and environ is os.environ and _backends_started():
    logging.warning("XLA:CPU flags %s not added: JAX's backends already started", added)
    return []
  if added:
    environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


def ynn_dot_enabled(environ: Optional[MutableMapping[str, str]] = None) -> bool:
  """Whether XLA_FLAGS routes XLA:CPU's dots through YNNPACK (which also makes XLA's own
  convolution kernel gradient fast: models/conv.py's "auto" rule reads this)."""
  environ = os.environ if environ is None else environ
  for flag in reversed(environ.get("XLA_FLAGS", "").split()):  # the last setting counts
    name, _, value = flag.partition("=")
    if name == YNN_FUSION_TYPE:
      return any(t.lstrip("+") == "dot" for t in value.split(","))
  return False


def _major_minor(version: str) -> Optional[tuple]:
  """(major, minor) of a version string such as '0.10.2' or '0.10.2.dev20261101'; None if not."""
  match = re.match(r"(\d+)\.(\d+)", version)
  return (int(match.group(1)), int(match.group(2))) if match else None


def _backends_started() -> bool:
  from jax._src import xla_bridge  # noqa: PLC0415
  return xla_bridge.backends_are_initialized()
