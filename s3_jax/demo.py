"""`make demo`: a short run of the learning configuration, then naive RAG and the searcher before and after
it on held-out questions — about 20 minutes on 2 CPU cores.

  python -m s3_jax.demo [--config configs/smollm2_wiki.py:learn,demo] [--workdir runs/demo]
      [--config.key=value ...]

1. trains (`python -m s3_jax.train`; rerunning resumes) into WORKDIR/train;
2. evaluates (`python -m s3_jax.evaluate`, resumable) on the config's `evaluate.sample` test questions —
   naive RAG, the searcher it started from, and the run's final HF export — into
   WORKDIR/eval/{rag,untrained,trained};
3. writes WORKDIR/results.md and WORKDIR/curves.png (`python -m s3_jax.results`) and prints the table with
   what a run this short can and cannot show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "configs/smollm2_wiki.py:learn,demo"

CAVEAT = """What this shows: every stage of s3's loop running end to end on real models and data — rollouts
through the BM25 service, Gain-Beyond-RAG rewards from the frozen generator, PPO updates, a checkpoint and
its HF export — and the same scoring for every row. What it cannot show: learning. A few PPO steps of a
few questions move a 135M searcher by little, and {n} held-out questions give each GenAcc a standard error
of about {se:.0f} points, so a difference here is noise. The learning experiment (3 seeds, 100 held-out
questions, curves, episodes) is experiments/laptop/ (results.md there; commands.sh reproduces it)."""


def run(config: Any, workdir: str | Path, *, log: Callable[[str], None] = print) -> tuple[str, str]:
  """Trains, evaluates the three rows and writes the page; returns the page's text and the caveat."""
  from s3_jax import evaluate, results, train

  workdir = Path(workdir).absolute()
  log(f"demo: {config.total_steps} PPO steps of {config.ppo.batch_size} questions into {workdir / 'train'}")
  train.main(config, workdir / "train", log=log)
  rows = {"rag": ("rag", None), "untrained": ("s3", None), "trained": ("s3", str(workdir / "train"))}
  for row, (method, checkpoint) in rows.items():
    log(f"demo: evaluating {row} on {config.evaluate.sample} held-out questions")
    evaluate.evaluate(config, method, workdir / "eval" / row, checkpoint=checkpoint, log=log)
  page = results.write_page(workdir, workdir / "results.md", workdir / "curves.png", episode_count=2)
  n = results.load_rows(workdir)["rag"]["questions"]
  return page, CAVEAT.format(n=n, se=100 * 0.5 / max(n, 1) ** 0.5)


def main(argv: Sequence[str] | None = None) -> None:
  from absl import flags

  from s3_jax import cli as cli_lib

  config_flag = cli_lib.config_flag(DEFAULT_CONFIG)
  workdir_flag = flags.DEFINE_string("workdir", "runs/demo", "the demo's folder (rerunning resumes)")

  def body(config) -> None:
    if not config.evaluate.sample:
      raise ValueError("evaluate.sample is 0 (every test question): the demo evaluates a small sample; "
                       "set --config.evaluate.sample=N")
    page, caveat = run(config, workdir_flag.value)
    table = page.split("\n\n")
    print("\n".join(["", "=" * 100, *[part for part in table if part.startswith("| row")],
                     "", next((p for p in table if p.startswith("trained −")), ""), "", caveat,
                     f"\npage: {Path(workdir_flag.value) / 'results.md'}, curves: "
                     f"{Path(workdir_flag.value) / 'curves.png'}"]))

  cli_lib.run(body, config_flag, argv=argv, errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
  main()
