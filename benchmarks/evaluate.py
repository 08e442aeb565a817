"""Evaluation speed on the SmolLM2 configuration (`configs/smollm2_wiki.py`: SmolLM2-135M-Instruct searcher
and generator, BM25 over the 10,033 Wikipedia summaries, FanOutQA test questions): questions per second of
`python -m s3_jax.evaluate` for `rag` and `s3`, where the time goes (searcher sampling, retrieval, generation,
judge), and, side by side, `rag` scored the way s3's `context.py` does it: one retrieval request, one answer
request and (when the span check fails) one judge request per question, in a serial loop (s3_protocol.md §9;
s3 runs 10 such loops in a process pool, which on a 2-core machine cannot beat one batched engine).

  python benchmarks/evaluate.py [--n 16] [--methods rag,s3] [--config configs/smollm2_wiki.py]
  python benchmarks/evaluate.py --commits at:4d143a6,here [--n 16] [--methods s3]

`--commits`: the evaluate CLI itself (`python -m s3_jax.evaluate`), one process per commit and method, each
commit's own code and defaults (`at:REV`: a worktree of REV; `here`: this checkout), the same questions, the
persistent compilation cache off, so both sides compile from nothing: questions per second after start-up
(compiling included) and where the time went, from each run's `timing.json`.

Services are started once, in process, as the evaluate CLI starts them, and warmed up on other questions
(trivia) first, so compile time is not counted; start-up is reported separately by the CLI.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)


def commits(paths: list[str], methods: list[str], n: int, config: str) -> None:
  """Each commit's evaluate CLI on the same `n` FanOutQA test questions, in turn; prints a row per run as it
  ends and the ratios to the first commit."""
  import subprocess
  import sys

  from timing import REPO, checkout

  rows = {}
  for method in methods:
    for path in paths:
      repo = REPO if path == "here" else checkout(path.removeprefix("at:"))
      with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "s3_jax.evaluate", "--config", config, "--method", method, "--out",
                   out, f"--config.evaluate.sample={n}", "--config.evaluate.datasets=fanout"]
        if path == "here" or "compile_cache" in (repo / "s3_jax" / "config_lib.py").read_text():
          command.append("--config.compile_cache=")
        done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
        if done.returncode:
          raise SystemExit(f"{path} {method} failed:\n{done.stderr[-3000:]}")
        rows[path, method] = t = json.loads((Path(out) / "timing.json").read_text())
      busy = t["seconds"] - t["startup"]
      print(f"{path} {method}: {t['questions_per_second']:.4f} q/s ({busy / t['questions']:.1f} s/question; "
            + ", ".join(f"{k} {100 * t[k] / busy:.0f}%" for k in ("sample", "retrieve", "generate", "judge",
                                                                    "other")) + ")", flush=True)
  for method in methods:
    first = rows[paths[0], method]["questions_per_second"]
    print(f"{method}: " + ", ".join(f"{p} {rows[p, method]['questions_per_second'] / first:.2f}x"
                                    for p in paths) + f" (vs {paths[0]})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=16, help="questions per method")
  parser.add_argument("--methods", default="rag,s3")
  parser.add_argument("--config", default="configs/smollm2_wiki.py")
  parser.add_argument("--commits", default="", help="at:REV,here: each commit's evaluate CLI, same run")
  args = parser.parse_args()
  if args.commits:
    paths = args.commits.split(",")
    bad = [p for p in paths if p != "here" and not (p.startswith("at:") and len(p) > 3)]
    if bad:
      parser.error(f"--commits: {bad} must be at:REV or here")
    commits(paths, args.methods.split(","), args.n, args.config)
    return

  from s3_jax import config_lib
  from s3_jax.data.eval_sets import load_sets
  from s3_jax.evaluate import evaluate
  from s3_jax.reward.answers import span_match
  from s3_jax.reward.judge import judge
  from s3_jax.reward.prompts import answer_messages
  from s3_jax.search.formats import generator_context
  from s3_jax.services.connect import open_services

  config = config_lib.load(args.config, [f"evaluate.sample={args.n}", "evaluate.datasets=fanout"])
  quiet = {"show_progress": False, "log": lambda *_: None}
  rows = {}
  with tempfile.TemporaryDirectory() as tmp, open_services(config, show_progress=False,
                                                           log=lambda *_: None) as services:
    tmp = Path(tmp)
    for method in args.methods.split(","):  # warm-up: compiles for this method's shapes
      evaluate(config_lib.load(args.config, ["evaluate.sample=4"]), method, tmp / f"warm_{method}",
               datasets="trivia", services=services, **quiet)
    for method in args.methods.split(","):
      evaluate(config, method, tmp / method, services=services, **quiet)
      rows[method] = json.loads((tmp / method / "timing.json").read_text())

    # s3's context.py: per question, one retrieval call, one answer call, one judge call if the span fails.
    [eval_set] = load_sets("fanout", config)
    start = time.perf_counter()
    for ex in eval_set.examples:
      [docs] = services.retriever.search([ex.question], config.evaluate.rag_topk)
      [answer] = services.generator.generate([answer_messages(ex.question, generator_context(docs))],
                                             temperature=0.0, max_tokens=config.generator.max_tokens)
      if config.reward.use_judge and not span_match(answer, ex.golden_answers):
        judge(services.generator, [answer], [ex.golden_answers])
    serial = time.perf_counter() - start

  print(f"{args.n} FanOutQA test questions, {config.retriever.kind}, generator {config.generator.model}, "
        f"judge {'on' if config.reward.use_judge else 'off'}")
  print("| method | q/s | s/q | sample | retrieve | generate | judge | other |")
  print("|---|---|---|---|---|---|---|---|")
  for method, t in rows.items():
    busy = t["seconds"] - t["startup"]
    stages = ("sample", "retrieve", "generate", "judge", "other")
    shares = " | ".join(f"{100 * t[k] / busy:.0f}%" for k in stages)
    print(f"| {method} | {t['questions_per_second']:.3f} | {1 / t['questions_per_second']:.2f} | {shares} |")
  if "rag" in rows:
    ours = rows["rag"]["questions_per_second"]
    print(f"| rag, s3-style serial loop | {args.n / serial:.3f} | {serial / args.n:.2f} | | | | | |")
    print(f"rag: batched one-pass / serial per-question = {ours / (args.n / serial):.2f}x")


if __name__ == "__main__":
  main()
