"""Ablation sweeps: a config file's `sweep(add)` expanded into runs, run one after another or handed to a
launcher, and their results gathered into one table.

  python -m launch.sweep --config configs/X.py[:arg] [--root DIR] [--launcher local|tpu_vm|gpu_vm] [--dry-run]
  python -m launch.sweep --summarize DIR

Each run gets `ROOT/NAME/` (ROOT default `runs/sweeps/<config>[_<arg>]`) holding `config.json`, the exact
resolved config, written before anything runs, and the command that trains it:
`python -m s3_jax.train --config SPEC --config.KEY=VALUE ... --workdir ROOT/NAME`. `local` runs them in turn
in subprocesses (a run whose metrics already reach `total_steps` is skipped; an unfinished one resumes from
its checkpoint); `tpu_vm` / `gpu_vm` hand each command to `launch/{tpu_vm,gpu_vm}.sh run`;
`--dry-run` prints the commands instead. `ROOT/sweep.json` lists the runs.

`--summarize DIR` reads every `DIR/*/metrics.jsonl` (the last step's reward and rollout metrics) and every
`DIR/*/eval/*/summary.json` (`python -m s3_jax.evaluate --out DIR/NAME/eval/METHOD`), and writes
`DIR/summary.md` and `DIR/summary.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

FINAL_METRICS = ("reward/mean", "reward/genacc", "reward/em", "reward/rag_genacc", "rollout/searches",
                 "rollout/generator_docs", "rollout/context_tokens", "time/step")


@dataclasses.dataclass
class Run:
  name: str
  overrides: list[str]
  workdir: Path
  command: list[str]


def _slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "run"


def default_root(spec: str) -> Path:
  path, _, arg = spec.partition(":")
  return Path("runs") / "sweeps" / (Path(path).stem + (f"_{_slug(arg)}" if arg else ""))


def expand(spec: str, root: str | Path | None = None) -> list[Run]:
  """The sweep's runs with their workdirs and training commands; writes each `config.json` and
  `ROOT/sweep.json`. Every run's config is loaded and validated first, so a bad sweep launches nothing."""
  from s3_jax import config_lib

  root = Path(root) if root is not None else default_root(spec)
  runs = []
  for name, overrides in config_lib.sweep_runs(spec):
    workdir = root / _slug(name)
    command = [sys.executable, "-m", "s3_jax.train", "--config", spec,
               *[f"--config.{o}" for o in overrides], "--workdir", str(workdir)]
    runs.append(Run(name, overrides, workdir, command))
  if len({r.workdir for r in runs}) != len(runs):
    raise ValueError(f"{spec}: two sweep runs map to the same folder name under {root}")
  for r in runs:
    config = config_lib.load(spec, r.overrides)
    r.workdir.mkdir(parents=True, exist_ok=True)
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    (r.workdir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")
  (root / "sweep.json").write_text(json.dumps(
      {"config": spec, "runs": [{"name": r.name, "overrides": r.overrides, "workdir": str(r.workdir),
                                 "command": shlex.join(r.command)} for r in runs]}, indent=2) + "\n")
  return runs


def finished(workdir: Path) -> bool:
  """Whether the run's metrics already reach its `total_steps` (so rerunning it would train nothing)."""
  metrics, config = workdir / "metrics.jsonl", workdir / "config.json"
  if not metrics.is_file() or not config.is_file():
    return False
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
  return bool(steps) and max(steps) >= json.loads(config.read_text())["total_steps"]


def launch(runs: list[Run], launcher: str, dry_run: bool, log=print) -> None:
  for i, run in enumerate(runs, start=1):
    if launcher == "local":
      command = run.command
    else:  # on the VM, `python` is the checkout's virtual environment (the scripts activate it)
      script = str(Path(__file__).parent / f"{launcher}.sh")
      command = ["bash", script, "run", "--", "python", *run.command[1:]]
    if dry_run:
      print(shlex.join(command))
      continue
    if launcher == "local" and finished(run.workdir):
      log(f"[{i}/{len(runs)}] {run.name}: finished, skipped ({run.workdir})")
      continue
    log(f"[{i}/{len(runs)}] {run.name}: {shlex.join(command)}")
    done = subprocess.run(command)
    if done.returncode != 0:
      raise SystemExit(f"sweep run {run.name!r} failed (exit {done.returncode}); its workdir is "
                       f"{run.workdir}. Rerun the sweep to resume it (finished runs are skipped).")


def _final_row(workdir: Path) -> dict[str, Any] | None:
  metrics = workdir / "metrics.jsonl"
  if not metrics.is_file():
    return None
  rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  return rows[-1] if rows else None


def summarize(root: str | Path) -> Path:
  """`ROOT/summary.md` (one row per run: last step's metrics and each evaluation's GenAcc (EM) average, then
  who answered and who judged each evaluation) and `ROOT/summary.png` (final mean reward and GenAcc per
  run)."""
  import matplotlib

  from s3_jax import report

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  root = Path(root)
  workdirs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())
  if not workdirs:
    raise FileNotFoundError(f"{root}: no run folders (with config.json) to summarize")
  finals = {w.name: _final_row(w) for w in workdirs}
  evals = {w.name: {p.parent.name: json.loads(p.read_text())["average"]
                    for p in sorted((w / "eval").glob("*/summary.json"))} for w in workdirs}
  methods = sorted({m for e in evals.values() for m in e})
  header = ["run", "steps", *FINAL_METRICS, *[f"eval {m}: GenAcc (EM)" for m in methods]]
  lines = [f"# Sweep {root}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for name in finals:
    row = finals[name]
    cells = [name, "–" if row is None else str(row["step"])]
    cells += ["–" if row is None or row.get(k) is None else f"{row[k]:.4g}" for k in FINAL_METRICS]
    for m in methods:
      e = evals[name].get(m)
      cells.append("–" if e is None else f"{100 * e['genacc']:.1f} ({100 * e['em']:.1f})")
    lines.append("| " + " | ".join(cells) + " |")
  scorers = sorted({(m, who["generator"], who["judge"]) for w in workdirs
                    for p in sorted((w / "eval").glob("*/predictions.jsonl"))
                    for m, who in [(p.parent.name, report.scorers(report.read_predictions(p)))]})
  if scorers:
    lines += ["", *(f"- eval {m}: answers by {generator}, judged by {judge}"
                    for m, generator, judge in scorers)]
  out = root / "summary.md"
  out.write_text("\n".join(lines) + "\n")

  names = list(finals)
  fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names)), 4), constrained_layout=True)
  x = range(len(names))
  for offset, key in ((-0.2, "reward/mean"), (0.2, "reward/genacc")):
    ax.bar([i + offset for i in x], [(finals[n] or {}).get(key) or 0.0 for n in names], 0.4, label=key)
  ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
  ax.set_title(f"final step: {root.name}")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.savefig(root / "summary.png", dpi=100)
  plt.close(fig)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0])
  parser.add_argument("--config", help="configs/X.py[:arg] with a sweep(add) function")
  parser.add_argument("--root", help="where the run folders go (default runs/sweeps/<config>)")
  parser.add_argument("--launcher", choices=("local", "tpu_vm", "gpu_vm"), default="local")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--summarize", metavar="DIR", help="gather finished runs into DIR/summary.md")
  args = parser.parse_args(argv)
  try:
    if args.summarize:
      print(summarize(args.summarize).read_text())
      return 0
    if not args.config:
      parser.error("--config (or --summarize DIR) is required")
    runs = expand(args.config, args.root)
    launch(runs, args.launcher, args.dry_run, log=lambda m: print(m, file=sys.stderr))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
