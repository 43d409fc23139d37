"""Separate hosts on one machine, as a pod's are: each process runs in its own UTS, pid and
mount namespaces (`unshare`, as root) with its own hostname, /etc/hosts, HOME, TMPDIR and cache
of local copies; loopback stays shared, so the coordinator and a storage emulator are reachable."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from dsno_jax import storage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "launch"))
import local  # noqa: E402  (launch/local.py: the environment of each JAX process)

UNSHARE = ["unshare", "--uts", "--pid", "--mount", "--fork", "--mount-proc",
           # the namespace's init dies with unshare, and every process in it with the init
           "--kill-child"]
# The init of a pid namespace ignores signals it has no handler for, so the host's shell is
# its init and the program a child that gets signals as on any machine; gloo resolves the
# hostname, so it goes in the host's own /etc/hosts.
_BOOT = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && "$@"; exit $?'


def unavailable() -> Optional[str]:
  """Why hosts cannot be simulated here (not root, no unshare, namespaces refused), or None."""
  if os.geteuid() != 0:
    return "simulated hosts need root (unshare of the UTS, pid and mount namespaces)"
  if not shutil.which("unshare"):
    return "simulated hosts need util-linux's unshare"
  trial = subprocess.run(UNSHARE + ["true"], capture_output=True, text=True)
  if trial.returncode:
    return f"unshare refused namespaces here: {trial.stderr.strip()}"
  return None


@dataclasses.dataclass
class Host:
  """One simulated host: its name, its own disk (`root`), its running program and log."""
  name: str
  root: str
  process: subprocess.Popen
  log: str

  @property
  def home(self) -> str:
    return os.path.join(self.root, "home")

  @property
  def cache(self) -> str:
    return os.path.join(self.root, "cache")

  @property
  def tmp(self) -> str:
    return os.path.join(self.root, "tmp")

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()

  def program_pid(self) -> int:
    """The host's program (the child of its init shell), as this machine numbers it."""
    init = _children(self.process.pid)
    programs = _children(init[0]) if init else []
    if not programs:
      raise ProcessLookupError(f"host {self.name} runs no program (exit status "
                               f"{self.process.poll()})")
    return programs[0]

  def terminate(self):
    """SIGTERM to the program, as a VM's shutdown or a scheduler's preemption sends it."""
    os.kill(self.program_pid(), signal.SIGTERM)

  def kill(self):
    """A hard kill of the whole host (a VM reset): every process in it, at once."""
    if self.process.poll() is None:
      self.process.kill()
    self.process.wait()

  def wait(self, timeout: float) -> Optional[int]:
    """The program's exit status, or None (the host killed) when it runs past `timeout` s."""
    try:
      return self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      return None


def _children(pid: int) -> List[int]:
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      return [int(p) for p in f.read().split()]
  except FileNotFoundError:
    return []


def start(name: str, root: str, command: Sequence[str], env: Dict[str, str], *,
          process_id: int, num_processes: int, port: int) -> Host:
  """Boots host `name` with its disk under `root` (kept if it exists) and runs `command` there as
  JAX process `process_id` of `num_processes`, coordinator at 127.0.0.1:`port`."""
  host = os.path.join(root, "etc_hosts")
  for directory in ("home", "cache", "tmp"):
    os.makedirs(os.path.join(root, directory), exist_ok=True)
  with open(host, "w") as f:
    f.write(f"127.0.0.1 localhost\n127.0.0.1 {name}\n")
  env = {**env, **local.process_envs(num_processes, 1, port)[process_id],
         "HOME": os.path.join(root, "home"), "TMPDIR": os.path.join(root, "tmp"),
         "PYTHONUNBUFFERED": "1",  # a host that aborts keeps its last words in its log
         storage.CACHE_ENV: os.path.join(root, "cache")}
  log = os.path.join(root, f"{name}.log")
  with open(log, "a") as out:
    process = subprocess.Popen(UNSHARE + ["sh", "-c", _BOOT, "boot", name, host, *command],
                               env=env, cwd=os.path.join(root, "home"), stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
  return Host(name, root, process, log)


def wait_for(condition, hosts: Sequence[Host], timeout: float, what: str):
  """Polls `condition()` until true; fails with the hosts' logs when one exits or time runs out."""
  deadline = time.time() + timeout
  while not condition():
    ended = [h for h in hosts if h.process.poll() is not None]
    if ended and condition():  # met just before the host exited
      return
    if ended or time.time() > deadline:
      why = (f"host {ended[0].name} exited with status {ended[0].process.returncode}" if ended
             else f"{timeout} s passed")
      raise AssertionError(f"waiting for {what}: {why}\n" + "\n".join(
          f"--- {h.name}:\n{h.output()[-3000:]}" for h in hosts))
    time.sleep(0.05)


def exits(hosts: Sequence[Host], timeout: float) -> List[Tuple[Optional[int], float]]:
  """Each host's (exit status, seconds from now until it exited); (None, timeout) for a host
  still running after `timeout` s, which is then killed."""
  start, ended = time.time(), {}
  while len(ended) < len(hosts) and time.time() < start + timeout:
    for host in hosts:
      if host.name not in ended and host.process.poll() is not None:
        ended[host.name] = (host.process.returncode, time.time() - start)
    time.sleep(0.05)
  for host in hosts:
    if host.name not in ended:
      host.kill()
  return [ended.get(host.name, (None, timeout)) for host in hosts]


def disk_use(path: str, *parts: str) -> int:
  """Bytes of the files below `path`; with `parts`, of those whose path below it contains one."""
  total = 0
  for directory, _, files in os.walk(path):
    for name in files:
      full = os.path.join(directory, name)
      if not parts or any(part in os.path.relpath(full, path) for part in parts):
        total += os.lstat(full).st_size
  return total
