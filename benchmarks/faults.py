"""The fault suite's table: runs the tests marked `faults` (each reproduces a failure found by
probing s3_jax as an adversarial user, then checks the fix) and prints, per probe, how many cases ran, were
handled (the test passed) and failed.

  python benchmarks/faults.py [--markdown] [-- extra pytest args]

A probe is a test file, its cases its test items (parametrized cases count one each). Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What each file probes, in the table's words.
PROBES = {
    "test_checkpoint": "checkpoint corruption (bytes changed, cut short, record cut, manifest/file missing)",
    "test_faults_http": "HTTP abuse (size, Content-Length, chunked, nested JSON, types, slow-loris, OpenAI)",
    "test_faults_data": "a corpus with bad rows (blank lines, invalid UTF-8, duplicates), failed builds",
    "test_faults_restart": "retriever and generator killed and restarted during a training step",
    "test_faults_services": "service addresses at start-up (malformed, nothing answering)",
    "test_train": "a corrupt newest checkpoint in a real training run",
    "test_config": "misspelt and mistyped --config overrides",
    "test_precompute": "precompute reruns keep their record",
    "test_retriever_service": "a retriever restart longer than the old retry count",
    "test_launch": "launch-script flags (after the verb, unknown, --help) and which errors are retried",
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
  parser.add_argument("pytest_args", nargs="*", help="after --: passed to pytest")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    report = Path(tmp) / "faults.xml"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "faults", f"--junitxml={report}",
                           "-p", "no:cacheprovider", *args.pytest_args], cwd=REPO)
    if not report.is_file():
      print("error: pytest wrote no report", file=sys.stderr)
      return done.returncode or 1
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in ET.parse(report).getroot().iter("testcase"):
      probe = case.get("classname", "").split(".")[-1]
      if not probe:  # a module skipped as a whole at collection (e.g. an optional package missing)
        continue
      failed = case.find("failure") is not None or case.find("error") is not None
      skipped = case.find("skipped") is not None
      counts[probe]["cases"] += 1
      counts[probe]["failed" if failed else "skipped" if skipped else "handled"] += 1
  rows = [(PROBES.get(p, p), c["cases"], c["handled"], c["failed"], c["skipped"]) for p, c in counts.items()]
  total = tuple(sum(r[i] for r in rows) for i in range(1, 5))
  header = ("probe", "cases", "handled", "failed", "skipped")
  if args.markdown:
    print("| " + " | ".join(header) + " |\n|---|---|---|---|---|")
    for row in [*rows, ("all", *total)]:
      print("| " + " | ".join(str(x) for x in row) + " |")
  else:
    width = max(len(r[0]) for r in rows)
    print(f"{header[0]:<{width}}  " + "  ".join(f"{h:>7}" for h in header[1:]))
    for row in [*rows, ("all", *total)]:
      print(f"{row[0]:<{width}}  " + "  ".join(f"{x:>7}" for x in row[1:]))
  return done.returncode


if __name__ == "__main__":
  sys.exit(main())
