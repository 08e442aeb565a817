"""Evaluation reports, all computed from `predictions.jsonl` alone: `summary.json`, `table.md` (the s3 paper's
Table 1 layout) and a bar chart.

summary.json = `{data_source: {metric: value}, "average": {...}}`, values as fractions (tables show %):

  genacc, em, span, f1   mean over questions (GenAcc = span ∨ judge; MIRAGE: the judge alone)
  judge                  share of the answers the judge was asked about that it accepted (null: never asked)
  judge_asked            share of the answers the judge was asked about
  context_docs           documents handed to the generator (after de-duplication)
  context_tokens         tokens of that context (the searcher's tokenizer)
  questions, runs        how many questions, how many runs of each

With several runs, each metric is the mean over runs of the per-run mean, and `<metric>_std` the sample
standard deviation (ddof 1) of the per-run means. "average" is the unweighted mean over data sources (the
paper's "Avg" column), computed per run the same way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("genacc", "em", "span", "f1", "judge", "judge_asked", "context_docs", "context_tokens")
SCORE_KEYS = ("genacc", "em", "span", "judge", "f1")


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
  from s3_jax.data.jsonl import iter_jsonl

  return [row for _, row in iter_jsonl(path)]


def _row_values(row: Mapping[str, Any]) -> dict[str, float | None]:
  scores = row["scores"]
  judge = scores["judge"]
  return {"genacc": float(scores["genacc"]), "em": float(scores["em"]), "span": float(scores["span"]),
          "f1": float(scores["f1"]), "judge": None if judge is None else float(judge),
          "judge_asked": float(judge is not None), "context_docs": float(row["context_docs"]),
          "context_tokens": float(row["context_tokens"])}


def _mean(values: Iterable[float | None]) -> float | None:
  kept = [v for v in values if v is not None]
  return float(np.mean(kept)) if kept else None


def _combine(per_run: Sequence[dict[str, float | None]]) -> dict[str, Any]:
  """Mean over runs of each metric, plus `_std` over runs when there are several."""
  out: dict[str, Any] = {}
  for metric in METRICS:
    values = [r[metric] for r in per_run if r[metric] is not None]
    out[metric] = float(np.mean(values)) if values else None
    if len(per_run) > 1:
      out[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return out


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """`{data_source: metrics, "average": metrics}` (see the module docstring)."""
  if not rows:
    raise ValueError("no predictions to summarize")
  grouped: dict[str, dict[int, list[dict[str, float | None]]]] = {}
  for row in rows:
    grouped.setdefault(row["data_source"], {}).setdefault(int(row["run"]), []).append(_row_values(row))
  runs = sorted({int(row["run"]) for row in rows})
  summary: dict[str, dict[str, Any]] = {}
  per_run_means: dict[str, dict[int, dict[str, float | None]]] = {}
  for source in sorted(grouped):
    by_run = grouped[source]
    if sorted(by_run) != runs:
      raise ValueError(f"data source {source!r} has runs {sorted(by_run)}, the predictions have {runs}: an "
                       f"unfinished evaluation (rerun it to complete)")
    counts = {len(v) for v in by_run.values()}
    if len(counts) != 1:
      raise ValueError(f"data source {source!r}: runs have different question counts {sorted(counts)}: an "
                       f"unfinished evaluation (rerun it to complete)")
    per_run_means[source] = {run: {m: _mean(v[m] for v in values) for m in METRICS}
                             for run, values in by_run.items()}
    summary[source] = _combine([per_run_means[source][run] for run in runs])
    summary[source].update(questions=counts.pop(), runs=len(runs))
  average_per_run = [{m: _mean(per_run_means[s][run][m] for s in per_run_means) for m in METRICS}
                     for run in runs]
  summary["average"] = _combine(average_per_run)
  summary["average"].update(questions=sum(summary[s]["questions"] for s in grouped), runs=len(runs))
  return summary


def _pct(value: float | None, std: float | None = None) -> str:
  if value is None:
    return "–"
  return f"{100 * value:.1f}" + (f"±{100 * std:.1f}" if std is not None else "")


def scorers(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """Who answered and who judged a run's predictions: `{"generator": ..., "judge": ...}` (distinct values
  joined; "unrecorded" for rows written before these were recorded)."""
  return {key: " / ".join(sorted({str(row.get(key) or "unrecorded") for row in rows})) or "unrecorded"
          for key in ("generator", "judge")}


def table_markdown(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], title: str = "",
                   setups: Mapping[str, Mapping[str, str]] | None = None) -> str:
  """Table 1 of the paper: a row per method, a column per data source and "Avg", cells "GenAcc (EM)" in %
  (± the std over runs when there are several), and the generator and judge that scored it (`setups`, per
  label, from `scorers`); then a details table per method."""
  sources = sorted({s for summary in summaries.values() for s in summary if s != "average"})
  setups = setups or {}
  lines = [f"# {title}", ""] if title else []
  lines += ["GenAcc (EM), % — GenAcc = span match or LLM judge (MIRAGE sets: the judge alone); ± is the "
            "standard deviation over runs.", "",
            "| Method | " + " | ".join(sources) + " | Avg | Generator | Judge |",
            "|---" * (len(sources) + 4) + "|"]
  for label, summary in summaries.items():
    cells = []
    for source in [*sources, "average"]:
      m = summary.get(source)
      cells.append("–" if m is None else f"{_pct(m['genacc'], m.get('genacc_std'))} ({_pct(m['em'])})")
    setup = setups.get(label, {})
    cells += [setup.get("generator", "unrecorded"), setup.get("judge", "unrecorded")]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  for label, summary in summaries.items():
    lines += ["", f"## {label}", "",
              "| data source | questions | runs | GenAcc | EM | span | F1 | judge (asked) | docs | tokens |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for source in [*sorted(s for s in summary if s != "average"), "average"]:
      m = summary[source]
      docs = "–" if m["context_docs"] is None else f"{m['context_docs']:.2f}"
      tokens = "–" if m["context_tokens"] is None else f"{m['context_tokens']:.0f}"
      genacc = _pct(m["genacc"], m.get("genacc_std"))
      lines.append(f"| {source} | {m['questions']} | {m['runs']} | {genacc} | {_pct(m['em'])} | "
                   f"{_pct(m['span'])} | {_pct(m['f1'])} | {_pct(m['judge'])} "
                   f"({_pct(m['judge_asked'])}) | {docs} | {tokens} |")
  return "\n".join(lines) + "\n"


def plot_summaries(summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], out: str | os.PathLike,
                   title: str = "") -> Path:
  """Grouped bars: GenAcc per data source (and Avg) for each method, EM as the hatched inner bar, error bars
  = std over runs."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sources = [*sorted({s for summary in summaries.values() for s in summary if s != "average"}), "average"]
  n = max(len(summaries), 1)
  width = 0.8 / n
  fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(sources) * max(1, n / 2)), 4.5), constrained_layout=True)
  x = np.arange(len(sources))
  for j, (label, summary) in enumerate(summaries.items()):
    genacc = [100 * (summary.get(s, {}).get("genacc") or 0.0) for s in sources]
    em = [100 * (summary.get(s, {}).get("em") or 0.0) for s in sources]
    std = [100 * (summary.get(s, {}).get("genacc_std") or 0.0) for s in sources]
    offset = x - 0.4 + width * (j + 0.5)
    bars = ax.bar(offset, genacc, width, yerr=std if any(std) else None, capsize=3, label=label)
    ax.bar(offset, em, width * 0.5, color=bars.patches[0].get_facecolor(), alpha=0.5, hatch="//",
           edgecolor="black", linewidth=0.5)
  ax.set_xticks(x, ["Avg" if s == "average" else s for s in sources], rotation=20)
  ax.set_ylabel("GenAcc % (hatched: EM %)")
  ax.set_ylim(0, 100)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "GenAcc by data source")
  out = Path(out)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def write_reports(out: str | os.PathLike, label: str) -> dict[str, Any]:
  """Recomputes `summary.json`, `table.md` and `genacc.png` in `out` from its `predictions.jsonl`."""
  out = Path(out)
  rows = read_predictions(out / "predictions.jsonl")
  summary = summarize(rows)
  (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
  (out / "table.md").write_text(table_markdown({label: summary}, title=label, setups={label: scorers(rows)}))
  plot_summaries({label: summary}, out / "genacc.png", title=label)
  return summary

