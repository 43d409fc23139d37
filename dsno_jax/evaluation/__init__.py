"""Evaluation: FID as a clu metric, Inception-v3, the digits classifier, one-step sampling, the table."""
from dsno_jax.evaluation.fid import FID
