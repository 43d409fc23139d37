"""dsno_jax: one-step sampling of diffusion models by learning the PF-ODE solution operator."""
__version__ = "0.1.0"
