"""Runs N JAX processes on this machine (loopback coordinator, gloo CPU collectives), as a pod would.

python launch/local.py --num_processes 2 --devices_per_process 2 [--timeout 600] [--dry-run] \
    -- python -m dsno_jax.main --config=configs/tiny.py --workdir=/tmp/w --mode=train_teacher
"""
import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading
from typing import Dict, List, Sequence


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_envs(num_processes: int, devices_per_process: int, port: int) -> List[Dict[str, str]]:
  """The environment of each process: coordinator, its id, its CPU devices, gloo collectives."""
  return [{
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(num_processes),
      "JAX_PROCESS_ID": str(rank),
      "JAX_PLATFORMS": "cpu",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
  } for rank in range(num_processes)]


def _pump(stream, prefix: str, sink):
  for line in iter(stream.readline, ""):
    sink.write(f"{prefix}{line}")
    sink.flush()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int,
           timeout: float, port: int = 0) -> List[int]:
  """Starts the processes, relays their output with a [rank] prefix, returns their exit codes.

  All are killed when one fails or the timeout passes (a hung collective never blocks forever).
  """
  envs = process_envs(num_processes, devices_per_process, port or free_port())
  procs = [subprocess.Popen(list(command), env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for env in envs]
  pumps = [threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sys.stdout), daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  try:
    for p in procs:
      p.wait(timeout=timeout)
      if p.returncode != 0:
        break
  except subprocess.TimeoutExpired:
    print(f"local.py: timed out after {timeout} s; killing all processes", file=sys.stderr)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
    for t in pumps:
      t.join(timeout=5)
  return [p.returncode for p in procs]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error(f"--num_processes={args.num_processes} and --devices_per_process="
                 f"{args.devices_per_process} must be at least 1")
  if args.dry_run:
    for env in process_envs(args.num_processes, args.devices_per_process, args.port or 12355):
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
    return 0
  codes = launch(command, args.num_processes, args.devices_per_process, args.timeout, args.port)
  print(f"local.py: exit codes {codes}", file=sys.stderr)
  return max(abs(c) for c in codes)


if __name__ == "__main__":
  sys.exit(main())
