"""Timing shared by the benchmark scripts, and the worktree of an earlier commit to compare against."""

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def checkout(rev: str) -> Path:
  """A worktree of this repository at `rev` (made once, kept in the temp folder), so a benchmark can run that
  commit's own code and defaults beside today's in one run (e.g. 4d143a6: the code before the fast-step
  work)."""
  folder = Path(tempfile.gettempdir()) / f"s3_jax_at_{rev}"
  if not folder.is_dir():
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(folder), rev], check=True,
                   capture_output=True, text=True)
  return folder


def median_time(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn`, after one warm-up call (which also compiles)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, warmup: int = 3) -> dict:
  """Median wall time of each of `fns`, calling them in turn `repeats` times (after `warmup` rounds) so
  that this VM's drift hits all of them alike."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}
