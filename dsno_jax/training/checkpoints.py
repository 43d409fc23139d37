"""Orbax checkpoints of the train state: saves checked as they finish, keep-last-N, restore of the
newest readable step (damaged ones moved aside), and config.json: the run's config and resumes."""
import datetime
import json
import logging as python_logging
import re
import sys
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dsno_jax import parallel, storage, trees
from dsno_jax.workdir import Workdir

_CONFIG_FILE = "config.json"
# The config section that holds each role's training settings.
SETTINGS_SECTIONS = {"teacher": "teacher.train", "student": "train", "refine": "refine"}
# Config fields that may change when a run resumes: how long, how visibly and how fast it
# trains, how the work is spread, where its inputs live. Every other field of the role's
# sections gives the saved state its meaning and must match the checkpoints' config.json.
RESUMABLE_FIELDS = ("profile", "distributed", "eval", "data.data_dir", "data.num_workers",
                    "tensorboard_upload_every_s",
                    "refine.in_pipeline", "teacher.train_from_scratch",
                    "trajectory.dir", "model.remat", "model.time_conv_impl") + tuple(
    f"{section}.{name}" for section in SETTINGS_SECTIONS.values()
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                 "sample_every", "learning_rate", "warmup_steps", "warmup_init", "milestones",
                 "decay", "grad_accum", "fsdp"))
_ABSENT = "<absent>"
_REMOVE_ATTEMPTS = 10  # tries at removing an unfinished save whose writes are still ending


def make_manager(workdir: str, role: str, settings) -> ocp.CheckpointManager:
  """Async manager keeping the last settings.keep_checkpoints saves.

  Unfinished saves of an earlier run (orbax's temporary directories) are removed.
  """
  return ocp.CheckpointManager(
      Workdir(workdir).checkpoints(role), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=settings.keep_checkpoints,
                                           enable_async_checkpointing=True, create=True,
                                           cleanup_tmp_directories=True))


def one_line(error: BaseException, limit: int = 400) -> str:
  """The innermost cause of an (orbax, TensorStore) error as one line, spec dumps cut."""
  while error.__cause__ is not None or (error.__context__ is not None
                                        and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  text = re.sub(r"\s*\[tensorstore_spec=.*", "", lines[0] if lines else "")
  text = f"{type(error).__name__}: {text}"
  return text if len(text) <= limit else text[:limit] + " ..."


class _DropAbandonedReads(python_logging.Filter):
  """Drops asyncio's reports of orbax's reads and writes abandoned after a failure."""

  def filter(self, record):
    return "exception was never retrieved" not in record.getMessage()


_fallout_quieted = False


def _quiet_failure_fallout():
  """Hides the echoes of a failed orbax read or write, once it has been reported.

  Orbax's other reads or writes of that step finish on their own afterwards: asyncio logs each
  as "exception was never retrieved", and TensorStore's callbacks into the closed event loop
  raise "Event loop is closed" (sys.unraisablehook), hundreds of tracebacks burying the one
  error that matters.
  """
  global _fallout_quieted
  if _fallout_quieted:
    return
  _fallout_quieted = True
  python_logging.getLogger("asyncio").addFilter(_DropAbandonedReads())
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      previous(unraisable)

  sys.unraisablehook = hook


# --- the config of the run and its resumes (config.json) --------------------------------------
def _flatten(tree: Dict, prefix: str = "") -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _read_record(directory: str) -> Optional[Dict]:
  """{"config": ..., "resumes": [...]} of config.json (a bare config from older runs), or None."""
  path = storage.join(directory, _CONFIG_FILE)
  if not storage.exists(path):
    return None
  try:
    record = json.loads(storage.read_text(path))
  except ValueError as e:
      raise ValueError(f"{path} is corrupt ({e}); it records the config of the checkpoints "
                     f"beside it: restore it, or move {directory} aside to start afresh"
                     ) from None
  return record if "resumes" in record else {"config": record, "resumes": []}


def _write_record(directory: str, record: Dict):
  if jax.process_index() != 0:
    return
  # never a half-written record
  storage.write_text(storage.join(directory, _CONFIG_FILE), json.dumps(record, indent=1))


def _describes(field: str, role: str) -> bool:
  """Whether `field` is part of what a `role` checkpoint means (the other role's training
  settings are not, nor, for the teacher, the trajectories)."""
  foreign = {"teacher": ("train.", "trajectory.", "refine."),
             "student": ("teacher.train.", "refine."),
             "refine": ("teacher.train.", "train.")}[role]
  return not field.startswith(foreign)


def _resumable(field: str) -> bool:
  return any(field == name or field.startswith(name + ".") for name in RESUMABLE_FIELDS)


def _differences(stored: Dict, config) -> Dict[str, tuple]:
  """{field: (stored value, current value)} of every differing leaf."""
  a, b = _flatten(stored), _flatten(json.loads(config.to_json()))
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)}


def check_meaning(directory: str, config, role: str):
  """ValueError listing the fields that give the checkpoints their meaning and differ now.

  A field that only one side has (added to or removed from the code since the checkpoints were
  written) is not compared: the code of either side never read it.
  """
  record = _read_record(directory)
  if record is None:
    return
  differ = {k: v for k, v in _differences(record["config"], config).items()
            if _describes(k, role) and not _resumable(k) and _ABSENT not in v}
  if differ:
    lines = "".join(f"\n  {k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
    raise ValueError(
        f"the checkpoints in {directory} were written with a different config; these fields "
        f"give the saved state its meaning and must match to resume:{lines}\n"
        f"Run with the checkpoints' values (recorded in {directory}/{_CONFIG_FILE}), or use "
        "a fresh workdir. Fields that may change on resume: "
        "dsno_jax.training.checkpoints.RESUMABLE_FIELDS.")


def record_start(directory: str, config, step: Optional[int]):
  """Writes config.json: a fresh record at step None, else this resume and what it changed."""
  record = _read_record(directory) if step is not None else None
  if record is None:
    record = {"config": None, "resumes": []}
  else:
    changed = {k: list(v) for k, v in _differences(record["config"], config).items()}
    record["resumes"].append({
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "step": int(step), "changed": changed})
  record["config"] = json.loads(config.to_json())
  _write_record(directory, record)


def _config_differences(directory: str, config, limit: int = 12) -> str:
  """The leaves of the stored config that differ from `config` (for the error message)."""
  record = _read_record(directory) if config is not None else None
  if record is None:
    return ""
  # fields that shape the parameters first
  order = lambda k: (not k.startswith(("model.", "data.", "trajectory.", "teacher.")), k)
  differ = _differences(record["config"], config)
  diffs = [f"{k}: checkpoint {differ[k][0]!r} vs now {differ[k][1]!r}"
           for k in sorted(differ, key=order)]
  if not diffs:
    return ""
  return "\n  config differences: " + "; ".join(diffs[:limit]) + (" ..." if len(diffs) > limit
                                                                  else "")


# --- restoring ----------------------------------------------------------------------------------
def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state, config=None,
                     prefix: str = "", stored=None):
  """ValueError naming every array whose stored shape differs from what this config builds.

  With a prefix (e.g. "ema_params/"), only the stored arrays under it are compared. `stored`
  is the step's item metadata when already read.
  """
  stored = manager.item_metadata(step) if stored is None else stored
  stored = {k: v for k, v in trees.shapes(stored.tree).items() if k.startswith(prefix)}
  mismatch = trees.compare(stored, trees.shapes(abstract_state))
  if mismatch:
    directory = str(manager.directory)
    raise ValueError(
        f"the checkpoint at {directory}/{step} was written with a different config (entries "
        f"of the checkpoint against what this config builds):\n{mismatch.describe(limit=6)}"
        f"{_config_differences(directory, config)}\n"
        "Use the config that wrote it, or a fresh workdir.")


def _step_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return epath.Path(manager.directory) / str(step)  # orbax's step names: the bare number


_READ_ATTEMPTS = 3  # tries at a read that fails with a transient error
# Failures that say nothing about the files: the network or the storage service (a 503, a
# timeout); TensorStore names them by their status codes.
_TRANSIENT = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED)\b|"
                        r"(?i:\b(HTTP|status|code)\D{0,20}(408|429|5\d\d)\b|service unavailable|"
                        r"too many requests|connection (reset|refused|aborted))")
_READ, _DAMAGED, _TRANSIENT_FAILURE = 0, 1, 2  # the verdicts on one read of a step


def is_transient(error: BaseException) -> bool:
  """Whether a failed read may succeed when tried again, rather than the files being damaged."""
  while error is not None:
    if isinstance(error, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _read(read):
  """(read(), None), or (None, the error) once it fails for good (transient errors are retried)."""
  for attempt in range(_READ_ATTEMPTS):
    try:
      return read(), None
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e) or attempt + 1 == _READ_ATTEMPTS:
        return None, e
      logging.warning("reading a checkpoint failed (%s); trying again", one_line(e))
      time.sleep(2.0 ** attempt)


def _agreed_verdict(manager: ocp.CheckpointManager, step: int, error) -> bool:
  """Whether the step was read, on process 0's verdict for all: moved aside (False) when
  process 0 found it damaged; an error when process 0's read failed transiently (never moved
  aside) or this process's read failed alone."""
  verdict = _READ if error is None else _TRANSIENT_FAILURE if is_transient(error) else _DAMAGED
  verdict = int(parallel.all_processes(np.int32(verdict))[0])
  path = _step_path(manager, step)
  if error is not None and verdict != _DAMAGED:
    _quiet_failure_fallout()
    logging.info("reading %s failed:", path, exc_info=error)  # the full trace, for the log
  what = f"({one_line(error)})" if error is not None else "on process 0"
  if verdict == _READ and error is not None:
    raise RuntimeError(f"reading the checkpoint {path} failed on process "
                       f"{jax.process_index()} {what}, though process 0 read it; it is left as "
                       "it is: run again to resume")
  if verdict == _TRANSIENT_FAILURE:
    raise RuntimeError(f"reading the checkpoint {path} failed {what}: the storage service or "
                       "the network failed, not the files; it is left as it is: run again to "
                       "resume")
  if verdict == _DAMAGED:
    _move_aside(manager, step, error)
  return verdict == _READ


def _move_aside(manager: ocp.CheckpointManager, step: int, error: Optional[Exception]):
  """Renames a step that process 0 failed to restore to `<step>.damaged-<time>` (kept, never
  deleted); the other processes wait for the rename."""
  _quiet_failure_fallout()
  path = _step_path(manager, step)
  aside = path.parent / f"{step}.damaged-{datetime.datetime.now():%Y%m%dT%H%M%S}"
  if error is not None:
    logging.info("restoring %s failed:", path, exc_info=error)  # the full trace, for the log
  if jax.process_index() == 0:
    path.rename(aside)
  parallel.barrier(f"dsno_jax:moved_aside_{step}")
  logging.warning("checkpoint %s cannot be restored (%s); moved it aside to %s and trying the "
                  "step before it", path,
                  one_line(error) if error is not None else "process 0 could not read it", aside)
  manager.reload()


def restore_latest(manager: ocp.CheckpointManager, abstract_state, shardings, config=None,
                   role: Optional[str] = None) -> Optional[Any]:
  """The newest state that restores, placed with `shardings`; None when nothing is saved.

  With `config` (and `role`): the checkpoints' config must mean the same (`check_meaning`),
  and config.json records this start. A step that process 0 fails to read is moved aside and
  the step before it tried; a read that fails transiently (a 503) is an error that leaves it
  in place; a config that builds other shapes is an error.
  """
  directory = str(manager.directory)
  steps = sorted(manager.all_steps(), reverse=True)
  if config is not None and steps:
    check_meaning(directory, config, role)
  target = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  for step in steps:
    stored, error = _read(lambda step=step: manager.item_metadata(step))
    if not _agreed_verdict(manager, step, error):
      continue
    check_compatible(manager, step, abstract_state, config, stored=stored)
    logging.info("restoring %s/%d", directory, step)
    state, error = _read(lambda step=step: manager.restore(
        step, args=ocp.args.StandardRestore(target)))
    if not _agreed_verdict(manager, step, error):
      continue
    if config is not None:
      record_start(directory, config, step)
    return state
  if config is not None:
    record_start(directory, config, None)
  return None


def save(manager: ocp.CheckpointManager, state, force: bool = False) -> bool:
  """Saves `state` at its step and waits until it is on disk, so a failed save (a full disk)
  stops the run here, naming the step; the checkpoints before it are untouched."""
  step = int(state.step)
  try:
    saved = manager.save(step, args=ocp.args.StandardSave(state), force=force)
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    _quiet_failure_fallout()
    logging.info("saving step %d failed:", step, exc_info=e)  # the full trace, for the log
    manager.reload()
    kept = manager.latest_step()
    raise RuntimeError(
        f"saving the checkpoint of step {step} in {manager.directory} failed: {one_line(e)}. "
        + (f"The checkpoint of step {kept} is intact; " if kept is not None else "") +
        "fix the cause (free disk space, permissions) and run again to resume"
        + ("." if kept is not None else " from the start.")) from None
  return saved


def close(manager: ocp.CheckpointManager):
  """Waits for the manager's saves and closes it; then removes what unfinished saves left.

  A save that failed was reported by `save`; its temporary step directory (orbax's
  "<step>.orbax-checkpoint-tmp...") holds nothing saved and is removed once no write is left.
  """
  try:
    manager.close()
  except Exception as e:  # pylint: disable=broad-except
    logging.info("closing the checkpoints in %s: %s: %s", manager.directory, type(e).__name__,
                 (str(e).splitlines() or [""])[0])  # a failed save was reported by `save`
  parallel.barrier("dsno_jax:checkpoints_closed")
  if jax.process_index() != 0:
    return
  for partial in epath.Path(manager.directory).glob("*.orbax-checkpoint-tmp*"):
    for attempt in range(_REMOVE_ATTEMPTS):
      try:
        partial.rmtree()
        logging.info("removed the unfinished save %s", partial)
        break
      except OSError:  # TensorStore may still be finishing writes that orbax abandoned
        time.sleep(0.2 * (attempt + 1))
    else:
      logging.warning("could not remove the unfinished save %s; the next run removes it",
                      partial)


def restore_ema_params(workdir: str, role: str, abstract_params, config=None, mesh=None):
  """(EMA params replicated on every device, step) of the newest checkpoint of `role`."""
  directory = Workdir(workdir).checkpoints(role)
  if not storage.isdir(directory):
    raise FileNotFoundError(f"no {role} checkpoints at {directory}; train first "
                            f"(--mode={'train' if role == 'student' else 'train_teacher'})")
  # the settings read_only implies, which orbax would otherwise change with a warning each
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler(),
                                  options=options)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint; train first")
  if config is not None:
    check_meaning(directory, config, role)
  mesh = mesh or parallel.make_mesh()
  item = {"ema_params": jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
      abstract_params)}
  try:
    try:
      stored = manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(directory, step, e, role) from None
    check_compatible(manager, step, item, config, prefix="ema_params/", stored=stored)
    try:
      restored = manager.restore(step, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(directory, step, e, role) from None
  finally:
    manager.close()
  return restored["ema_params"], step


def _unreadable(directory: str, step: int, error: Exception, role: str) -> ValueError:
  """The error for an export from a damaged step: training moves it aside, an export does not."""
  _quiet_failure_fallout()
  logging.info("reading %s/%d failed:", directory, step, exc_info=error)
  mode = "train" if role == "student" else "train_teacher"
  return ValueError(f"the checkpoint {directory}/{step} cannot be read ({one_line(error)}); "
                    f"run --mode={mode}, which moves it aside and trains again from the step "
                    "before it")
