"""dsno_jax: one-step sampling of diffusion models by learning the PF-ODE solution operator."""
from dsno_jax import storage as _storage

# Before any Cloud Storage client is imported: some read their settings at import.
_storage.configure_emulator()

from dsno_jax import backend as _backend  # noqa: E402

__version__ = "0.1.0"

# XLA reads XLA_FLAGS when JAX starts its backends: add the CPU flag now if it still can be,
# so that `import dsno_jax.models` in a notebook gets it too (see backend.py).
_backend.add_cpu_flags(quiet=True)


def __getattr__(name):
  # `load` brings in flax, orbax and the models: imported on first use, so `import dsno_jax`
  # stays light (PEP 562).
  if name == "load":
    from dsno_jax.api import load  # pylint: disable=g-import-not-at-top
    globals()["load"] = load
    return load
  raise AttributeError(f"module 'dsno_jax' has no attribute {name!r}")
