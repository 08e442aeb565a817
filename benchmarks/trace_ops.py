"""Where a traced run's device time goes, op by op: sums the wall time of each compiled program's ops in a
`jax.profiler` Perfetto trace (`rollout.py --trace DIR`), by program and kind of op (fusion kinds, custom-call
targets), largest first.

  XLA_FLAGS=--xla_dump_to=/tmp/hlo python benchmarks/rollout.py --models smollm2 --greedy --repeats 2 \\
      --paths cache-bf16 --trace /tmp/trace
  python benchmarks/trace_ops.py /tmp/trace [--hlo /tmp/hlo] [--top 25]

XLA:CPU names a custom call `ffi_call.N` in its trace; with `--hlo` (the folder of `--xla_dump_to`: its
optimised modules) each is shown as its target and result shape (`s3_matmul f32[16,1536]`). Op names are
numbered per compiled module, and a program compiled for several shapes reuses them: a name whose shape
differs between compilations is shown as its target alone, one whose target differs as `ffi_call (ambiguous)`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

CUSTOM_CALL = re.compile(r"%(ffi_call\.\d+) = (\S+) custom-call\(.*?custom_call_target=\"(\w+)\"")


def custom_calls(folder: Path) -> dict[tuple[str, str], str]:
  """(module name, op name) -> "target shape" over the dump's optimised modules."""
  seen: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
  for path in folder.glob("*after_optimizations.txt"):
    module = path.name.split(".")[1]
    for match in CUSTOM_CALL.finditer(path.read_text(errors="replace")):
      name, shape, target = match.groups()
      seen[(module, name)].add(f"{target} {shape.split('{')[0]}")
  out = {}
  for key, found in seen.items():
    targets = {f.split()[0] for f in found}
    if len(found) == 1:
      out[key] = next(iter(found))
    else:
      out[key] = f"{targets.pop()} (shapes vary)" if len(targets) == 1 else "ffi_call (ambiguous)"
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("trace", help="a folder holding one or more *.trace.json.gz (searched recursively)")
  parser.add_argument("--hlo", default="", help="the --xla_dump_to folder of the traced process")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  names = custom_calls(Path(args.hlo)) if args.hlo else {}
  for path in sorted(Path(args.trace).rglob("*.trace.json.gz")):
    events = json.load(gzip.open(path))["traceEvents"]
    ops = collections.Counter()
    count = collections.Counter()
    programs = collections.Counter()
    for event in events:
      module = event.get("args", {}).get("hlo_module")
      if event.get("ph") != "X" or module is None or event["name"].startswith("ThunkExecutor"):
        continue
      op = event["name"]
      kind = names.get((module, op), op.rsplit(".", 1)[0] if op.rsplit(".", 1)[-1].isdigit() else op)
      ops[(module, kind)] += event["dur"]
      count[(module, kind)] += 1
      programs[module] += event["dur"]
    total = sum(programs.values())
    print(f"{path.parent.parent.parent.parent.name}: {total / 1e6:.2f} s in compiled programs' ops")
    for module, us in programs.most_common():
      print(f"  {us / 1e6:8.3f} s  {100 * us / total:5.1f}%  {module}")
    print(f"  top {args.top} (program, op kind): seconds, share, calls")
    for (module, kind), us in ops.most_common(args.top):
      print(f"  {us / 1e6:8.3f} s  {100 * us / total:5.1f}%  {count[(module, kind)]:7d}  {module:<24} {kind}")


if __name__ == "__main__":
  main()
