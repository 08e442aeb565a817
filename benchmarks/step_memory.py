"""Where a whole PPO step's memory goes: the resident set sampled every 0.2 s through one or more steps of
`configs/smollm2_wiki.py:runlocal` at 3-3-3 (as `train_step.py --whole-step`), reported as the peak within
each phase (setup — which includes the precompute —, rollout, reward, score, update), the phase in which the
process peak fell, and at the end of each phase the bytes of JAX's live arrays against the resident set before
and after `malloc_trim(0)` (`--trim`: what glibc's heap held on to rather than what the program holds).

  python benchmarks/step_memory.py [--questions 16] [--steps 1] [--path new-shared] [--trace out.jsonl]
                                   [--trim]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import sys
import threading
import time
from pathlib import Path

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import WHOLE_STEP_PATHS, whole_step_child


def _rss_gb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1e6
  raise RuntimeError("/proc/self/status has no VmRSS line")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--questions", type=int, default=16)
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--path", default="new-shared", choices=tuple(WHOLE_STEP_PATHS))
  parser.add_argument("--trace", help="also write every sample as JSON lines here")
  parser.add_argument("--trim", action="store_true", help="malloc_trim(0) at the end of each phase")
  args = parser.parse_args()

  import jax

  from s3_jax import metrics as metrics_lib

  libc = ctypes.CDLL("libc.so.6")
  ends: list[str] = []

  phase = ["setup"]
  samples: list[tuple[float, float, str]] = []
  stop = threading.Event()

  def sample() -> None:
    start = time.perf_counter()
    while not stop.is_set():
      samples.append((time.perf_counter() - start, _rss_gb(), "/".join(phase)))
      time.sleep(0.2)

  original = metrics_lib.Stopwatch.__call__

  @contextlib.contextmanager
  def traced(self, name):
    phase.append(name)
    try:
      with original(self, name):
        yield
    finally:
      phase.pop()
      live = sum(x.nbytes for x in jax.live_arrays()) / 1e9
      before = _rss_gb()
      after = (libc.malloc_trim(0), _rss_gb())[1] if args.trim else before
      ends.append(f"  end of {name:<8} live arrays {live:5.2f} GB, RSS {before:5.2f} GB"
                  + (f" -> {after:5.2f} GB after malloc_trim" if args.trim else ""))

  metrics_lib.Stopwatch.__call__ = traced
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  result = whole_step_child(args.path, args.questions, args.steps)
  stop.set()
  thread.join()
  peaks: dict[str, float] = {}
  for _, rss, name in samples:
    peaks[name] = max(peaks.get(name, 0.0), rss)
  top = max(samples, key=lambda s: s[1])
  print(f"path {args.path}, {args.questions} questions, {args.steps} step(s): ru_maxrss "
        f"{result['peak_rss_gb']:.1f} GB; sampled peak {top[1]:.1f} GB at {top[0]:.0f} s in {top[2]}")
  for name, rss in peaks.items():
    print(f"  {name:<24} peak {rss:5.1f} GB")
  print("\n".join(ends))
  print("last step: " + ", ".join(f"{k[5:]} {v:.1f} s" for k, v in result.items() if k.startswith("time/")))
  if args.trace:
    with open(args.trace, "w") as f:
      for t, rss, name in samples:
        f.write(json.dumps({"t": round(t, 2), "rss_gb": round(rss, 3), "phase": name}) + "\n")


if __name__ == "__main__":
  main()
