"""One small function per mode; `pipeline` runs them in order, skipping finished stages."""
import importlib

# mode -> "module:function", each called as function(config, workdir)
MODES = {
    "train_teacher": "dsno_jax.training.loop:train_teacher",
    "generate": "dsno_jax.data.generate:generate",
    "train": "dsno_jax.training.loop:train_student",
    "export": "dsno_jax.training.checkpoints:export_student",
    "sample": "dsno_jax.evaluation.sampling:sample",
    "evaluate": "dsno_jax.evaluation.evaluate:evaluate",
    "pipeline": "dsno_jax.pipeline:pipeline",
}


def run(mode: str, config, workdir: str):
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; expected one of {sorted(MODES)}")
  module, function = MODES[mode].split(":")
  return getattr(importlib.import_module(module), function)(config, workdir)
