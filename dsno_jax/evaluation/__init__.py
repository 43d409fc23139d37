"""Evaluation: FID as a clu metric, Inception-v3, the digits classifier, sampling and plots."""
from dsno_jax.evaluation.fid import FID
