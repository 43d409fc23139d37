"""Orbax checkpoints of the train state: async saves, keep-last-N, restore-latest, config checks."""
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dsno_jax import parallel, trees
from dsno_jax.workdir import Workdir

_CONFIG_FILE = "config.json"


def make_manager(workdir: str, role: str, settings, config=None) -> ocp.CheckpointManager:
  """Async manager keeping the last settings.keep_checkpoints saves; records the run's config."""
  directory = Workdir(workdir).checkpoints(role)
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=settings.keep_checkpoints,
                                           enable_async_checkpointing=True, create=True))
  config_file = os.path.join(directory, _CONFIG_FILE)
  if config is not None and jax.process_index() == 0 and not os.path.exists(config_file):
    with open(config_file, "w") as f:
      f.write(config.to_json(indent=1))
  return manager


def _config_differences(directory: str, config, limit: int = 12) -> str:
  """The leaves of the stored config that differ from `config` (for the error message)."""
  config_file = os.path.join(directory, _CONFIG_FILE)
  if config is None or not os.path.exists(config_file):
    return ""
  with open(config_file) as f:
    stored = json.load(f)
  current = json.loads(config.to_json())

  def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flatten(v, f"{prefix}{k}."))
      else:
        out[prefix + k] = v
    return out

  a, b = flatten(stored), flatten(current)
  # fields that shape the parameters first
  order = lambda k: (not k.startswith(("model.", "data.", "trajectory.", "teacher.")), k)
  diffs = [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
           for k in sorted(set(a) | set(b), key=order) if a.get(k) != b.get(k)]
  if not diffs:
    return ""
  return "\n  config differences: " + "; ".join(diffs[:limit]) + (" ..." if len(diffs) > limit
                                                                  else "")


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state, config=None,
                     prefix: str = ""):
  """ValueError naming every array whose stored shape differs from what this config builds.

  With a prefix (e.g. "ema_params/"), only the stored arrays under it are compared.
  """
  stored = {k: v for k, v in trees.shapes(manager.item_metadata(step).tree).items()
            if k.startswith(prefix)}
  mismatch = trees.compare(stored, trees.shapes(abstract_state))
  if mismatch:
    directory = str(manager.directory)
    raise ValueError(
        f"the checkpoint at {directory}/{step} was written with a different config (entries "
        f"of the checkpoint against what this config builds):\n{mismatch.describe(limit=6)}"
        f"{_config_differences(directory, config)}\n"
        "Use the config that wrote it, or a fresh workdir.")


def restore_latest(manager: ocp.CheckpointManager, abstract_state, shardings,
                   config=None) -> Optional[Any]:
  """The newest saved state placed with `shardings`, or None when nothing is saved."""
  step = manager.latest_step()
  if step is None:
    return None
  check_compatible(manager, step, abstract_state, config)
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  logging.info("restoring %s/%d", manager.directory, step)
  return manager.restore(step, args=ocp.args.StandardRestore(target))


def save(manager: ocp.CheckpointManager, state, force: bool = False) -> bool:
  """Starts an async save of `state` at its step; the device->host copy happens before return."""
  return manager.save(int(state.step), args=ocp.args.StandardSave(state), force=force)


def restore_ema_params(workdir: str, role: str, abstract_params, config=None, mesh=None):
  """(EMA params replicated on every device, step) of the newest checkpoint of `role`."""
  directory = Workdir(workdir).checkpoints(role)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no {role} checkpoints at {directory}; train first "
                            f"(--mode={'train' if role == 'student' else 'train_teacher'})")
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint; train first")
  mesh = mesh or parallel.make_mesh()
  item = {"ema_params": jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
      abstract_params)}
  check_compatible(manager, step, item, config, prefix="ema_params/")
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  manager.close()
  return restored["ema_params"], step
