"""Teachers: exact Gaussian-mixture denoisers, the configured UNet teacher, and its trajectories."""
from dsno_jax.teachers.exact import GaussianMixture, digits_mixture, gaussian_flow
from dsno_jax.teachers.loading import load_teacher, load_teacher_params
