"""dsno_jax: one-step sampling of diffusion models by learning the PF-ODE solution operator."""
from dsno_jax import backend as _backend

__version__ = "0.1.0"

# XLA reads XLA_FLAGS when JAX starts its backends: add the CPU flag now if it still can be,
# so that `import dsno_jax.models` in a notebook gets it too (see backend.py).
_backend.add_cpu_flags(quiet=True)
