"""Orbax checkpoints of the train state (async, keep-last-N, restore-latest) and the student export."""
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from dsno_jax import model_io, models
from dsno_jax.training import sharding

ROLES = ("teacher", "student")
_CONFIG_FILE = "config.json"


def checkpoint_dir(workdir: str, role: str) -> str:
  if role not in ROLES:
    raise ValueError(f"role={role!r}; expected one of {ROLES}")
  return os.path.join(os.path.abspath(workdir), "checkpoints", role)


def make_manager(workdir: str, role: str, settings, config=None) -> ocp.CheckpointManager:
  """Async manager keeping the last settings.keep_checkpoints saves; records the run's config."""
  directory = checkpoint_dir(workdir, role)
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=settings.keep_checkpoints,
                                           enable_async_checkpointing=True, create=True))
  config_file = os.path.join(directory, _CONFIG_FILE)
  if config is not None and jax.process_index() == 0 and not os.path.exists(config_file):
    with open(config_file, "w") as f:
      f.write(config.to_json(indent=1))
  return manager


def _path_names(path) -> str:
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return "/".join(names)


def _flat_shapes(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_names(path): tuple(leaf.shape) for path, leaf in leaves if leaf is not None}


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
  stored = {k: v for k, v in _flat_shapes(manager.item_metadata(step).tree).items()
            if k.startswith(prefix)}
  wanted = _flat_shapes(abstract_state)
  problems = [f"{k}: checkpoint {stored.get(k)} vs config {wanted.get(k)}"
              for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
  if problems:
    directory = str(manager.directory)
    raise ValueError(
        f"the checkpoint at {directory}/{step} was written with a different config: "
        f"{len(problems)} arrays differ, e.g. {problems[:6]}."
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
  directory = checkpoint_dir(workdir, role)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no {role} checkpoints at {directory}; train first "
                            f"(--mode={'train' if role == 'student' else 'train_teacher'})")
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint; train first")
  mesh = mesh or sharding.make_mesh()
  item = {"ema_params": jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh)),
      abstract_params)}
  check_compatible(manager, step, item, config, prefix="ema_params/")
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  manager.close()
  return restored["ema_params"], step


def to_host(tree, mesh):
  """Global arrays (replicated or sharded, on one or several processes) -> numpy, on every host."""
  gather = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))
  tree = sharding.compile_in_lockstep(gather, tree, name="to_host")(tree)
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def export_student(config, workdir: str) -> str:
  """Writes the EMA student of the newest checkpoint to WORKDIR/export (model_io format)."""
  sharding.initialize_distributed(config)
  abstract = models.param_shapes(models.init_student, config)
  mesh = sharding.make_mesh()
  params, step = restore_ema_params(workdir, "student", abstract, config, mesh)
  path = model_io.save_model(os.path.join(workdir, "export"), to_host(params, mesh), config,
                             role="student")
  sharding.barrier("dsno_jax:export_student")  # process 0 finishes the export's files last
  logging.info("exported the EMA student of step %d to %s", step, path)
  return path
