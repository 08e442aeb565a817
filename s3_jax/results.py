"""A learning experiment's results page, generated from its outputs alone (no number typed by hand).

  python -m s3_jax.results EXPERIMENT [--out EXPERIMENT/results.md] [--curves EXPERIMENT/curves.png]
      [--episodes 4]

EXPERIMENT holds what the experiment's commands wrote:

  train/seed<S>/        training workdirs (`python -m s3_jax.train ... --workdir`; `metrics.jsonl` is read)
  eval/<row>/           evaluation outputs (`python -m s3_jax.evaluate ... --out`; `predictions.jsonl`),
                        either one folder or one per seed (`eval/<row>/seed<S>/`). Rows, in table order:
                        closed_book, rag, untrained, warm_start, trained, best_dev (any may be missing but
                        `trained`)
  probe/<name>.json     optional: `python -m s3_jax.probe --out` records, one column each of a signal table
  tries/<name>/<seed>/  optional: metrics.jsonl of a setting tried and replaced, shown as a step table, with
                        its note.md (why it was replaced) and its eval/ (an evaluation's outputs) if present
  machine.txt           optional: the machine the experiment ran on, one line (the evaluations' wall times
                        come from their `timing.json`)
  commands.sh           optional: the exact commands, copied into the page verbatim

Every row must cover the same questions (data source and id): the page refuses to compare rows over different
questions. A row over several seeds shows the mean ± the sample standard deviation (ddof 1) over seeds of each
seed's mean; a row of one evaluation shows its mean. The bar the page checks: trained − naive RAG
> 2 × the trained row's std over seeds, and trained > untrained.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from s3_jax import metrics as metrics_lib
from s3_jax import report

ROWS = {"closed_book": "closed-book (no retrieval)", "rag": "naive RAG (question's BM25 top 3)",
        "untrained": "s3 searcher, untrained (step 0)",
        "warm_start": "s3 searcher after the format warm start (SFT; RL's step 0)",
        "trained": "s3 searcher, trained (final checkpoint)",
        "best_dev": "s3 searcher, best checkpoint by dev GenAcc"}

# (title, key or derived key): one panel each in the curves PNG, a line per seed.
CURVES = (("reward (GBR, the training reward)", "reward/mean"),
          ("reward − β·KL (sum over the response)", "reward/token_reward_sum"),
          ("rollout GenAcc", "reward/genacc"),
          ("naive RAG GenAcc (the GBR baseline)", "reward/rag_genacc"),
          ("valid-action rate", "valid_action_rate"),
          ("searches per episode", "rollout/searches"),
          ("documents selected per episode", "rollout/docs_selected"),
          ("KL to the reference", "reward/kl"),
          ("policy entropy", "actor/entropy"),
          ("value explained variance", "critic/explained_variance"))


def _value(row: Mapping[str, Any], key: str) -> float:
  if key == "valid_action_rate":
    rate = row.get("rollout/invalid_action_rate")
    return math.nan if rate is None else 1.0 - rate
  value = row.get(key)
  return math.nan if value is None else float(value)


def _seed_folders(folder: Path) -> dict[str, Path]:
  """`{seed label: folder}`: `folder` itself ("") when it holds the outputs, else its `seed*/` children."""
  if (folder / "predictions.jsonl").is_file() or (folder / "metrics.jsonl").is_file():
    return {"": folder}
  seeds = {p.name: p for p in sorted(folder.glob("seed*")) if p.is_dir()}
  if not seeds:
    raise FileNotFoundError(f"{folder}: neither outputs (predictions.jsonl / metrics.jsonl) nor seed*/ "
                            "folders")
  return seeds


def _question_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """GenAcc, EM and span-check means over a run's questions (the first run when an evaluation has several),
  and the judge's part: the share of questions whose GenAcc is the judge's yes alone (the span check
  failed)."""
  first = min(int(r["run"]) for r in rows)
  rows = [r for r in rows if int(r["run"]) == first]
  out = {m: statistics.fmean(float(r["scores"][m]) for r in rows) for m in ("genacc", "em", "span")}
  out["judge_only"] = statistics.fmean(float(bool(r["scores"]["genacc"]) and not r["scores"]["span"])
                                       for r in rows)
  return out


def load_rows(experiment: Path, unfinished: list[str] | None = None, *,
              require_trained: bool = True) -> dict[str, dict[str, Any]]:
  """`{row: {"seeds": {label: {"genacc", "em"}}, "questions": n, "predictions": {label: rows}}}`; raises
  when rows cover different questions or (`require_trained`) `trained` is missing. An evaluation still under
  way (a row or seed whose questions are a strict part of the others') is left out and named in
  `unfinished`."""
  out: dict[str, dict[str, Any]] = {}
  reference: tuple[str, set[tuple[str, str]]] | None = None
  for row in ROWS:
    folder = experiment / "eval" / row
    if not folder.exists():
      continue
    seeds, predictions = {}, {}
    for label, path in _seed_folders(folder).items():
      rows = report.read_predictions(path / "predictions.jsonl") if (path / "predictions.jsonl").is_file() \
          else []
      ids = {(r["data_source"], str(r["id"])) for r in rows}
      if reference is None and rows:
        reference = (str(path), ids)
      elif (reference is not None and ids < reference[1]) or not rows:
        if unfinished is None:
          raise ValueError(f"{path}: {len(ids)} of the questions evaluated: an evaluation under way")
        unfinished.append(f"{row}{' ' + label if label else ''} ({len(ids)} questions so far)")
        continue
      elif ids != reference[1]:
        raise ValueError(f"{path}: {len(ids)} questions, {len(ids ^ reference[1])} of them not shared with "
                         f"{reference[0]} ({len(reference[1])}): every row must cover the same questions")
      seeds[label], predictions[label] = _question_means(rows), rows
    if seeds:
      out[row] = {"seeds": seeds, "questions": len(reference[1]), "predictions": predictions}
  if require_trained and "trained" not in out:
    raise FileNotFoundError(f"{experiment / 'eval' / 'trained'}: the trained searcher's evaluation is "
                            "missing")
  return out


def _stat(seeds: Mapping[str, Mapping[str, float]], metric: str) -> tuple[float, float | None]:
  values = [s[metric] for s in seeds.values()]
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _cell(mean: float, std: float | None) -> str:
  return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def verdict(rows: Mapping[str, Mapping[str, Any]], metric: str = "genacc") -> str:
  """The bar, in one sentence, from the table's numbers of `metric` (GenAcc, or "span": the span check
  alone, no judge)."""
  if "trained" not in rows:
    return "No trained searcher evaluated yet: the bar cannot be judged."
  trained, trained_std = _stat(rows["trained"]["seeds"], metric)
  parts = []
  if "rag" in rows:
    rag = _stat(rows["rag"]["seeds"], metric)[0]
    if trained_std is None:
      parts.append(f"trained − naive RAG = {100 * (trained - rag):+.1f} points (one seed: no std to compare)")
    else:
      margin = trained - rag - 2 * trained_std
      parts.append(f"trained − naive RAG = {100 * (trained - rag):+.1f} points against 2 × std = "
                   f"{200 * trained_std:.1f}: **{'met' if margin > 0 else 'not met'}** "
                   f"({100 * margin:+.1f} points)")
  if "untrained" in rows:
    untrained = _stat(rows["untrained"]["seeds"], metric)[0]
    parts.append(f"trained − untrained = {100 * (trained - untrained):+.1f} points: "
                 f"**{'above' if trained > untrained else 'not above'}**")
  if "warm_start" in rows:
    start = _stat(rows["warm_start"]["seeds"], metric)[0]
    parts.append(f"trained − warm start = {100 * (trained - start):+.1f} points (what RL added)")
  text = "; ".join(parts) + "."
  return text if metric == "genacc" else f"On the span check alone (no judge): {text[0].lower()}{text[1:]}"


def _per_question(data: Mapping[str, Any], metric: str) -> dict[tuple[str, str], float]:
  """A row's score of each question (the first run of each seed's evaluation), averaged over its seeds."""
  scores: dict[tuple[str, str], list[float]] = {}
  for predictions in data["predictions"].values():
    first = min(int(r["run"]) for r in predictions)
    for r in predictions:
      if int(r["run"]) == first:
        scores.setdefault((r["data_source"], str(r["id"])), []).append(float(r["scores"][metric]))
  return {key: statistics.fmean(values) for key, values in scores.items()}


# The rows a trained searcher (and a try) is compared with question by question, and their names on the page.
PAIRED_WITH = {"rag": "naive RAG", "warm_start": "warm start", "untrained": "untrained"}


def _difference(label: str, mine: Mapping[tuple[str, str], float], rows: Mapping[str, Mapping[str, Any]],
                other: str, metric: str) -> str:
  """`label − other = mean ± 95% interval points (better on n questions, worse on m)` over `mine`'s
  questions, each of `other`'s scores averaged over its seeds."""
  theirs = _per_question(rows[other], metric)
  diffs = [mine[key] - theirs[key] for key in mine]
  half = 1.96 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
  better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
  return (f"{label} − {PAIRED_WITH[other]} = {100 * statistics.fmean(diffs):+.1f} ± {100 * half:.1f} points "
          f"(better on {better} questions, worse on {worse})")


def paired(rows: Mapping[str, Mapping[str, Any]], metric: str = "genacc") -> str:
  """The trained row against naive RAG and the warm start question by question: the mean paired difference
  with its 95% interval (1.96 standard errors over the questions) and how many questions went each way. The
  bar's 2 × std over seeds measures the seeds' spread only; this measures the noise of the question sample,
  which with ~100 questions is several points. "" without a trained row."""
  if "trained" not in rows:
    return ""
  trained = _per_question(rows["trained"], metric)
  parts = [_difference("trained", trained, rows, other, metric) for other in PAIRED_WITH if other in rows]
  label = "GenAcc" if metric == "genacc" else "the span check"
  return (f"Question by question ({label}, each question's score averaged over seeds; ± a 95% interval over "
          f"the {len(trained)} questions): " + "; ".join(parts)
          + ". The bar's 2 × std counts the spread over seeds only, not this noise of the question sample.") \
      if parts else ""


def table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """The rows' GenAcc and EM, then the span check alone (GenAcc without the judge) and the judge's part
  (questions right by the judge's yes alone)."""
  lines = ["| row | questions | seeds | GenAcc % | EM % | GenAcc per seed | span % (no judge) "
           "| judge-only % |", "|---|---|---|---|---|---|---|---|"]
  for row, data in rows.items():
    seeds = data["seeds"]
    per_seed = ", ".join(f"{label or 'one run'} {100 * s['genacc']:.1f}" for label, s in seeds.items())
    lines.append(f"| {ROWS[row]} | {data['questions']} | {len(seeds)} | {_cell(*_stat(seeds, 'genacc'))} | "
                 f"{_cell(*_stat(seeds, 'em'))} | {per_seed} | {_cell(*_stat(seeds, 'span'))} | "
                 f"{_cell(*_stat(seeds, 'judge_only'))} |")
  return "\n".join(lines)


def answer_sources(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """Where each row's right answers come from (the span check, per seed, then mean over seeds): how often the
  generator's context holds a gold answer at all (what the searcher controls: the retrieval's recall), how
  often the answer is right when it does (what the generator controls), and right answers without one (the
  generator's own knowledge or a guess). An analysis that reads the gold answers, never a training signal."""
  from s3_jax.reward.answers import span_match

  lines = ["| row | gold answer in the generator's context | right when it is (span) "
           "| right when it is not (span) |", "|---|---|---|---|"]
  for row, data in rows.items():
    found, read, guessed = [], [], []
    for preds in data["predictions"].values():
      first = min(int(r["run"]) for r in preds)
      preds = [r for r in preds if int(r["run"]) == first]
      has = [bool(r.get("context")) and span_match(r["context"], r["golden_answers"]) for r in preds]
      right = [bool(r["scores"]["span"]) for r in preds]
      found.append(statistics.fmean(has))
      with_gold = [ok for ok, h in zip(right, has, strict=True) if h]
      read.append(statistics.fmean(with_gold) if with_gold else math.nan)
      guessed.append(sum(ok for ok, h in zip(right, has, strict=True) if not h) / len(preds))
    cells = [f"{100 * statistics.fmean(found):.1f}%",
             f"{100 * statistics.fmean(read):.1f}%" if all(map(math.isfinite, read)) else "–",
             f"{100 * statistics.fmean(guessed):.1f} of 100"]
    lines.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def episodes(rows: Mapping[str, Mapping[str, Any]], count: int) -> str:
  """The first `count` questions by (data source, id) — never chosen by score — as the untrained and the
  trained searcher (their first seed) handled them, with naive RAG's verdict for the same question."""
  if count <= 0 or "untrained" not in rows or "trained" not in rows:
    return ""
  def first_seed(row):
    label = sorted(rows[row]["predictions"])[0]
    preds = rows[row]["predictions"][label]
    first = min(int(r["run"]) for r in preds)
    return label, {(r["data_source"], str(r["id"])): r for r in preds if int(r["run"]) == first}

  (u_label, untrained), (t_label, trained) = first_seed("untrained"), first_seed("trained")
  rag = first_seed("rag")[1] if "rag" in rows else {}
  blocks = []
  for key in sorted(trained)[:count]:
    head = f"**{trained[key]['question']}** (gold: {', '.join(trained[key]['golden_answers'][:3])}"
    head += f"; naive RAG GenAcc {rag[key]['scores']['genacc']:.0f})" if key in rag else ")"
    lines = [head, "", "```"]
    for name, label, preds in (("untrained", u_label, untrained), ("trained", t_label, trained)):
      r = preds[key]
      trace = r.get("trace") or {}
      lines += [f"{name}{' ' + label if label else ''}: queries {trace.get('queries', [])}, "
                f"{trace.get('docs_selected', '?')} documents selected, {trace.get('turns', '?')} turns",
                f"  answer {r['answer']!r} -> GenAcc {r['scores']['genacc']:.0f}, EM {r['scores']['em']:.0f}"]
    blocks.append("\n".join([*lines, "```"]))
  return "\n\n".join(blocks)


# (label, how to show it from a probe record's metrics): the probe's columns (s3_jax/probe.py).
PROBE_ROWS = (
    ("episodes with a nonzero reward", lambda m, n: f"{m['probe/nonzero_reward']:.0f} / {n}"),
    ("reward (GBR), mean", lambda m, n: f"{m['reward/mean']:.3f}"),
    ("rollout GenAcc", lambda m, n: f"{m['reward/genacc']:.3f}"),
    ("episodes that search", lambda m, n: f"{m['probe/episodes_with_a_search']:.0f} / {n}"),
    ("searches per episode", lambda m, n: f"{m['rollout/searches']:.2f}"),
    ("queries that are the template's `[search query]`",
     lambda m, n: f"{m['probe/placeholder_queries']:.0f} / {m['probe/queries']:.0f}"),
    ("documents selected per episode", lambda m, n: f"{m['rollout/docs_selected']:.2f}"),
    ("invalid-action rate (per turn)", lambda m, n: f"{m['rollout/invalid_action_rate']:.3f}"),
    ("episodes ended by `<search_complete>`", lambda m, n: f"{m['rollout/ended_by_completion']:.2f}"),
    ("ceiling: an answer in the question's BM25 top 12",
     lambda m, n: f"{m['probe/answer_in_top12']:.0f} / {n}"),
    ("ceiling: generator GenAcc on those documents", lambda m, n: f"{m['probe/oracle_genacc']:.3f}"),
)


def probes(experiment: Path) -> str:
  """The step-1 signal table from `probe/*.json` (`python -m s3_jax.probe --out`), a column per file in name
  order; "" without any."""
  import json

  files = sorted((experiment / "probe").glob("*.json"))
  if not files:
    return ""
  records = [json.loads(f.read_text(encoding="utf-8")) for f in files]
  lines = ["| | " + " | ".join(f.stem for f in files) + " |", "|---|" + "---|" * len(files)]
  for label, show in PROBE_ROWS:
    lines.append(f"| {label} | " + " | ".join(show(r["metrics"], int(r["metrics"]["probe/episodes"]))
                                              for r in records) + " |")
  settings = {(r["questions"], r["skip"], r["seed"], r["data"]) for r in records}
  note = ("" if len(settings) == 1 else " (the files differ in questions, skip, seed or data: "
          "compare with care)")
  q, skip, seed, data = sorted(settings)[0]
  return "\n".join([f"{q} filtered training questions of `{data}` (the first {skip} of the file left out), "
                    f"sampling seed {seed}, no update{note}:", "", *lines])


def plot_curves(experiment: Path, out: Path, runs: Mapping[str, Sequence[Mapping[str, Any]]] | None = None
                ) -> Path:
  """One panel per `CURVES` entry, a line per training seed (`runs`: `{label: metrics rows}`, default every
  seed's metrics.jsonl under `train/`)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if runs is None:
    runs = {label: metrics_lib.read_metrics(path)
            for label, path in _seed_folders(experiment / "train").items()}
  empty = [label for label, rows in runs.items() if not rows]
  if empty:
    raise FileNotFoundError(f"{experiment / 'train'}: no metrics.jsonl rows for "
                            f"{', '.join(empty) or 'the run'}")
  cols = 5
  fig, axes = plt.subplots(math.ceil(len(CURVES) / cols), cols, figsize=(4 * cols, 7),
                           constrained_layout=True)
  for ax, (title, key) in zip(axes.flat, CURVES, strict=True):
    for label, rows in runs.items():
      values = [_value(r, key) for r in rows]
      if any(math.isfinite(v) for v in values):
        ax.plot([r["step"] for r in rows], values, marker="o", markersize=2, label=label or "run")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PPO step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  fig.suptitle(f"s3_jax training curves: {experiment.name}")
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


# (column, metric key) of the earlier tries' step tables
TRY_COLUMNS = (("reward", "reward/mean"), ("searches / episode", "rollout/searches"),
               ("docs selected", "rollout/docs_selected"), ("turns", "rollout/turns"),
               ("entropy", "actor/entropy"), ("KL", "reward/kl"),
               ("value expl. var.", "critic/explained_variance"))


def tries(experiment: Path, table_rows: Mapping[str, Mapping[str, Any]] | None = None) -> str:
  """Each `tries/<name>/<seed>/metrics.jsonl` (a setting tried and replaced, e.g. a learning rate that
  collapsed the policy, or a remedy) as a step table, with its `note.md` and its held-out evaluation
  (`eval/`) when there is one — compared question by question with the table's rows (naive RAG, the warm
  start, the untrained searcher) when it covers their questions — so the page shows what was tried besides
  the configuration of the table; "" when there are none."""
  blocks = []
  for run in sorted(p for p in (experiment / "tries").glob("*/*") if (p / "metrics.jsonl").is_file()):
    rows = metrics_lib.read_metrics(run)
    lines = [f"`tries/{run.parent.name}/{run.name}`: {len(rows)} step(s)", ""]
    if (run / "note.md").is_file():
      lines += [(run / "note.md").read_text(encoding="utf-8").strip(), ""]
    if (run / "eval" / "predictions.jsonl").is_file():
      evaluated = report.read_predictions(run / "eval" / "predictions.jsonl")
      means = _question_means(evaluated)
      lines += [f"Held-out evaluation of its last step: GenAcc {100 * means['genacc']:.1f}, "
                f"EM {100 * means['em']:.1f} on {len(evaluated)} questions. The span check alone (no judge): "
                f"{100 * means['span']:.1f}.", ""]
      others = [o for o in PAIRED_WITH if table_rows and o in table_rows]
      if others:
        label = f"{run.parent.name} {run.name}"
        mine = {metric: _per_question({"predictions": {"": evaluated}}, metric)
                for metric in ("genacc", "span")}
        if all(set(mine["genacc"]) == set(_per_question(table_rows[o], "genacc")) for o in others):
          for metric, name in (("genacc", "GenAcc"), ("span", "the span check")):
            parts = [_difference(label, mine[metric], table_rows, o, metric) for o in others]
            lines += [f"Question by question ({name}; ± a 95% interval over the {len(mine[metric])} "
                      "questions): " + "; ".join(parts) + ".", ""]
        else:
          lines += ["Its questions are not the table's: no question-by-question comparison.", ""]
    lines += ["| step | " + " | ".join(c for c, _ in TRY_COLUMNS) + " |", "|---|" + "---|" * len(TRY_COLUMNS)]
    for row in rows:
      cells = [_value(row, k) for _, k in TRY_COLUMNS]
      lines.append(f"| {row['step']} | " + " | ".join(f"{v:.3f}" if math.isfinite(v) else "–" for v in cells)
                   + " |")
    blocks.append("\n".join(lines))
  return "\n\n".join(blocks)


def _rewarded(row: Mapping[str, Any]) -> float:
  """The fraction of a step's episodes with a nonzero reward: `reward/nonzero`, or, in runs from before that
  metric, `reward/genacc` where the step's naive-RAG GenAcc was 0 on every question (s3's filter keeps only
  those: then GBR is nonzero exactly when the answer is right); NaN otherwise."""
  if "reward/nonzero" in row:
    return float(row["reward/nonzero"])
  if row.get("reward/rag_genacc") == 0.0 and "reward/genacc" in row:
    return float(row["reward/genacc"])
  return math.nan


def _episodes_per_step(run: Path) -> int | None:
  import json

  config = run / "config.json"
  if not config.is_file():
    return None
  c = json.loads(config.read_text(encoding="utf-8"))
  return int(c["ppo"]["batch_size"]) * int(c["rollout"].get("samples_per_question", 1))


def _first_last(rows: Sequence[Mapping[str, Any]], key: str, digits: int = 2) -> str:
  values = [_value(r, key) for r in rows]
  values = [v for v in values if math.isfinite(v)]
  return f"{values[0]:.{digits}f} → {values[-1]:.{digits}f}" if values else "–"


def training_signal(experiment: Path, steps: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  """Why a run learns or does not, per seed, from its metrics: how many episodes earned a nonzero reward (the
  only ones whose advantage is not the baseline's), how the searcher's behaviour and the policy moved
  (first → last step), and how far it moved from the reference (KL)."""
  lines = ["| seed | steps | episodes | episodes with a nonzero reward | valid-action rate "
           "| searches / episode | docs selected | entropy | KL to the reference (last step) "
           "| value expl. var. (last step) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for label, rows in steps.items():
    if not rows:
      continue
    per_step = _episodes_per_step(experiment / "train" / label) if label else None
    episodes = per_step * len(rows) if per_step else None
    rewarded = [_rewarded(r) for r in rows]
    if per_step and all(math.isfinite(x) for x in rewarded):
      counts = [round(x * per_step) for x in rewarded]
      cell = f"{sum(counts)} ({', '.join(map(str, counts))} by step)"
    else:
      cell = "–"
    kl, explained = _value(rows[-1], "reward/kl"), _value(rows[-1], "critic/explained_variance")
    lines.append(f"| {label or 'run'} | {len(rows)} | {episodes or '–'} | {cell} | "
                 f"{_first_last(rows, 'valid_action_rate')} | {_first_last(rows, 'rollout/searches')} | "
                 f"{_first_last(rows, 'rollout/docs_selected')} | {_first_last(rows, 'actor/entropy', 3)} | "
                 f"{f'{kl:.4f}' if math.isfinite(kl) else '–'} | "
                 f"{f'{explained:.3f}' if math.isfinite(explained) else '–'} |")
  return "\n".join(lines)


# Under the table of what the reward paid for.
FORMAT_NOTE = (
    "An episode whose generator read naive RAG's own documents (the same titles; the question's BM25 top 3, "
    "whether or not it searched) can earn a reward only through the context format: the generator sees them "
    "in D_s3's format where naive RAG's baseline, as in s3's code, used the retrieval script's (s3_spec.md "
    "§3.3). Such a reward pays for nothing the search found.")


def _rag_documents(folder: Path) -> dict[tuple[str, str], list[str]] | None:
  """Naive RAG's documents (titles, in order) of each training question of the run in `folder`: the first
  `precompute.context_docs` of its precompute's `retrieval_train.jsonl` (the folder named by the run's
  `config.json`, relative to the working directory); None when the run or that file is not at hand."""
  import json

  config = folder / "config.json"
  if not config.is_file():
    return None
  precompute = json.loads(config.read_text(encoding="utf-8")).get("precompute", {})
  path = Path(precompute.get("dir", "")) / "retrieval_train.jsonl"
  if not precompute.get("dir") or not path.is_file():
    return None
  docs, n = {}, precompute["context_docs"]
  for line in path.read_text(encoding="utf-8").splitlines():
    row = json.loads(line)
    docs[(row["data_source"], row["question"])] = [d["title"] for d in row["docs"][:n]]
  return docs


def _read_rag_documents(episode: Mapping[str, Any], rag: Mapping[tuple[str, str], list[str]],
                        folder: Path) -> bool:
  """Whether the episode's generator read exactly naive RAG's documents (the same titles, any order)."""
  key = (episode["data_source"], episode["question"])
  if key not in rag:
    raise ValueError(f"{folder}: episode of step {episode['step']} asks {episode['question']!r}, which the "
                     "run's precompute has no documents for")
  return set(episode["generator_docs"]) == set(rag[key])


def rewards_by_search(experiment: Path) -> str:
  """From each seed's saved episodes (`train/<seed>/rollouts/step_*.jsonl`): how often an episode that never
  searched (the generator then reads the initial block, naive RAG's own top documents, in D_s3's format)
  earned a nonzero reward, against one that searched; and how many episodes, and how many of the rewarded
  ones, gave the generator exactly naive RAG's documents (the same titles; the run's precompute,
  `_rag_documents`). GBR pays for those whenever the generator answers from D_s3's context format what it
  missed from naive RAG's: a reward for the format, not for anything the search found. Tries that saved
  their episodes (`tries/<name>/<seed>/rollouts/`) get rows of their own, after the seeds. "" when no run
  saved its episodes."""
  import json

  lines = ["| seed | steps | episodes without a search: rewarded / all | with a search: rewarded / all "
           "| episodes whose generator read naive RAG's own documents | rewarded episodes that did |",
           "|---|---|---|---|---|---|"]
  runs = _seed_folders(experiment / "train") if (experiment / "train").is_dir() else {}
  runs = {label or "run": folder for label, folder in runs.items()}
  runs.update({f"try `{p.parent.name}` {p.name}": p for p in sorted((experiment / "tries").glob("*/*"))
               if (p / "rollouts").is_dir()})
  for label, folder in runs.items():
    files = sorted((folder / "rollouts").glob("step_*.jsonl"))
    if not files:
      continue
    episodes = [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    cells = []
    for searched in (False, True):
      group = [e for e in episodes if bool(e["searches"]) == searched]
      rewarded = sum(e["reward"] != 0 for e in group)
      cells.append(f"{rewarded} / {len(group)}" + (f" ({100 * rewarded / len(group):.1f}%)" if group else ""))
    rag = _rag_documents(folder)
    if rag is None:
      cells += ["–", "–"]
    else:
      same = [_read_rag_documents(e, rag, folder) for e in episodes]
      rewarded = [x for x, e in zip(same, episodes, strict=True) if e["reward"] != 0]
      cells += [f"{sum(same)} / {len(episodes)}", f"{sum(rewarded)} / {len(rewarded)}"]
    lines.append(f"| {label} | {len(files)} | {' | '.join(cells)} |")
  return "\n".join(lines) if len(lines) > 2 else ""


def wall_times(experiment: Path, rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The machine (`machine.txt`, written by the experiment's script) and each evaluation's wall time
  (`timing.json` of `python -m s3_jax.evaluate`), as page lines."""
  import json

  machine = experiment / "machine.txt"
  lines = [f"- machine: {machine.read_text(encoding='utf-8').strip()}" if machine.is_file()
           else "- machine: not recorded (no machine.txt)"]
  for row in rows:
    for label, path in _seed_folders(experiment / "eval" / row).items():
      timing = path / "timing.json"
      if timing.is_file():
        t = json.loads(timing.read_text(encoding="utf-8"))
        lines.append(f"- evaluation {row}{' ' + label if label else ''}: {t['questions']} questions in "
                     f"{t['seconds'] / 60:.1f} min")
  return lines


def write_page(experiment: Path, out: Path, curves: Path, episode_count: int = 4) -> str:
  unfinished: list[str] = []
  rows = load_rows(experiment, unfinished, require_trained=False)
  # Training runs; one that has begun but finished no step yet is named, not plotted.
  train = experiment / "train"
  steps = ({label: metrics_lib.read_metrics(path) for label, path in _seed_folders(train).items()}
           if train.is_dir() and any(train.iterdir()) else {})
  trained = any(steps.values())
  if trained:
    plot_curves(experiment, curves, {label: rows for label, rows in steps.items() if rows})
  train_lines = [f"- {label or 'run'}: {len(r)} steps, "
                 f"{sum(x.get('time/step', 0.0) for x in r) / 3600:.2f} h of steps" if r else
                 f"- {label or 'run'}: under way, no step finished yet" for label, r in steps.items()]
  page = [f"# Results: {experiment.name}", "", "Generated by `python -m s3_jax.results` from the "
          "experiment's outputs; every row covers the same held-out questions. GenAcc is s3's: the span "
          "check (a gold answer in the answer), else the LLM judge's yes; span % is the span check alone, "
          "judge-only % the questions the judge's yes alone made right.", "", table(rows), "",
          *([f"Not in the table yet (evaluations under way): {', '.join(unfinished)}.", ""] if unfinished
            else []),
          verdict(rows), "", *([verdict(rows, "span"), ""] if "trained" in rows else []),
          *([paired(rows), "", paired(rows, "span"), ""] if "trained" in rows else []),
          *([f"![training curves]({_relative(curves, out.parent)})", ""] if trained else []),
          "## Training", "", *(train_lines or ["No training run yet."])]
  if trained:
    page += ["", "### The training signal, per seed (first → last step)", "",
             training_signal(experiment, steps)]
    by_search = rewards_by_search(experiment)
    if by_search:
      page += ["", "What the reward paid for (seeds and tries that saved their episodes, `rollouts/`):", "",
               by_search, "", FORMAT_NOTE]
  page += ["", "## Machine and wall time", "", *wall_times(experiment, rows)]
  earlier = tries(experiment, rows)
  if earlier:
    page += ["", "## Tries (settings replaced, and remedies tried: recorded, not in the table)", "", earlier]
  signal = probes(experiment)
  if signal:
    page += ["", "## What PPO sees at step 1 (`python -m s3_jax.probe`)", "", signal]
  if rows:
    page += ["", "## Where the right answers come from (the span check, mean over seeds)", "",
             answer_sources(rows), "",
             "A searcher raises the first column by finding answer-bearing documents the question's own BM25 "
             "top 3 misses; the second is how well the generator reads what it is given; the third needs no "
             "document with the answer (the generator's own knowledge, or a guess)."]
  shown = episodes(rows, episode_count)
  if shown:
    page += ["", "## Episodes before and after training", "",
             "The first questions by id (not chosen by score), first seed of each row.", "", shown]
  commands = experiment / "commands.sh"
  if commands.is_file():
    page += ["", "## Commands", "", "```sh", commands.read_text(encoding="utf-8").rstrip(), "```"]
  text = "\n".join(page) + "\n"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text, encoding="utf-8")
  return text


def _relative(path: Path, start: Path) -> str:
  import os

  return os.path.relpath(path.resolve(), start.resolve())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s3_jax.results", description=__doc__.split("\n")[0])
  parser.add_argument("experiment", type=Path)
  parser.add_argument("--out", type=Path, default=None, help="default EXPERIMENT/results.md")
  parser.add_argument("--curves", type=Path, default=None, help="default EXPERIMENT/curves.png")
  parser.add_argument("--episodes", type=int, default=4)
  args = parser.parse_args(argv)
  try:
    text = write_page(args.experiment, args.out or args.experiment / "results.md",
                      args.curves or args.experiment / "curves.png", args.episodes)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
