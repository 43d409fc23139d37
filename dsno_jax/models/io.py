"""The saved-model format: parameters (orbax) plus the config that builds them (model.json)."""
import json
import os
import shutil
from typing import Dict, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dsno_jax import storage
from dsno_jax.workdir import resolve

ROLES = ("teacher", "student", "classifier")
_META = "model.json"
_PARAMS = "params"


def save_model(path: str, params, config, role: str) -> str:
  """Writes `path/params` (orbax) and `path/model.json` (role + config); returns path.

  Written to a temporary sibling and renamed, so an existing export is never half-replaced.
  Cloud Storage renames object by object, so there an export is written in place with
  model.json last: `is_export` is false until it is whole.
  """
  if role not in ROLES:
    raise ValueError(f"role={role!r}; expected one of {ROLES}")
  path = resolve(path)
  if storage.is_remote(path):
    return _save_in_place(path, params, config, role)
  tmp = path + ".tmp"
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(tmp, _PARAMS), jax.tree_util.tree_map(np.asarray, params))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(tmp, _META), "w") as f:
      f.write(_meta_json(config, role))
    if os.path.exists(path):
      os.rename(path, path + ".old")
    os.rename(tmp, path)
    if os.path.exists(path + ".old"):
      shutil.rmtree(path + ".old")
  if jax.process_count() > 1:  # no process may read the export before process 0 renamed it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"save_model {path}")
  return path


def _meta_json(config, role: str) -> str:
  return json.dumps({"format": "dsno_jax.model", "role": role,
                     "config": json.loads(config.to_json())}, indent=1)


def _save_in_place(path: str, params, config, role: str) -> str:
  """save_model on Cloud Storage: old export removed, params written, model.json last."""
  if jax.process_index() == 0:
    storage.rmtree(path)
  checkpointer = ocp.StandardCheckpointer()  # its save starts with a barrier of all processes
  checkpointer.save(storage.path(storage.join(path, _PARAMS)),
                    jax.tree_util.tree_map(np.asarray, params))
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    storage.write_text(storage.join(path, _META), _meta_json(config, role))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"save_model {path}")
  return path


def is_export(path: str) -> bool:
  """True when `path` holds a whole `save_model` export (its model.json is written last)."""
  return storage.isfile(storage.join(path, _META))


def read_model_meta(path: str) -> Dict:
  meta_file = storage.join(path, _META)
  if not storage.isfile(meta_file):
    raise FileNotFoundError(f"{path} is not a dsno_jax model export: {meta_file} is missing")
  try:
    meta = json.loads(storage.read_text(meta_file))
  except json.JSONDecodeError as e:
    raise ValueError(f"{meta_file} is corrupt ({e}); expected the JSON that save_model writes")
  if meta.get("format") != "dsno_jax.model" or meta.get("role") not in ROLES:
    raise ValueError(f"{meta_file} is not a dsno_jax model export (format={meta.get('format')!r},"
                     f" role={meta.get('role')!r})")
  return meta


def load_model(path: str) -> Tuple[Dict, ml_collections.ConfigDict, str]:
  """(params as numpy arrays, the config that builds them, role) of a `save_model` export."""
  meta = read_model_meta(path)
  params = ocp.StandardCheckpointer().restore(storage.path(storage.join(resolve(path), _PARAMS)))
  config = ml_collections.ConfigDict(meta["config"])
  return params, config, meta["role"]


def load_student(path: str, mode: str) -> Tuple[Dict, ml_collections.ConfigDict]:
  """(params, config) of the student exported at `path` by --mode=`mode`, or an error saying
  which mode writes it."""
  try:
    params, config, role = load_model(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"no exported student at {path}: run --mode={mode} first ({e})"
                            ) from None
  if role != "student":
    raise ValueError(f"{path} holds a {role}, expected the exported student")
  return params, config
