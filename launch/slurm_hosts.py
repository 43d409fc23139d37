"""Expands a SLURM node list ("gpu[01-03,07],login1") into host names, one a line (no scontrol needed)."""
import re
import sys


def expand(nodelist: str):
  hosts = []
  for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", nodelist):
    match = re.fullmatch(r"(.*)\[(.*)\]", part)
    if not match:
      hosts.append(part)
      continue
    prefix, ranges = match.groups()
    for item in ranges.split(","):
      lo, _, hi = item.partition("-")
      for i in range(int(lo), int(hi or lo) + 1):
        hosts.append(f"{prefix}{i:0{len(lo)}d}")
  return hosts


if __name__ == "__main__":
  print("\n".join(expand(sys.argv[1])))
