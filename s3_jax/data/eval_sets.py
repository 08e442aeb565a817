"""The question sets an evaluation runs on, by name (`--datasets a,b,...`).

* general QA in FlashRAG's JSONL layout (`RUC-NLPIR/FlashRAG_datasets`: `{folder}/{name}/{split}.jsonl`, rows
  `{"id", "question", "golden_answers", "metadata"}`): `nq`, `triviaqa`, `popqa`, `hotpotqa`,
  `2wikimultihopqa`, `musique`, `bamboogle`, read from `evaluate.flashrag_dir`; the split is `test`, else
  `dev`, else `train`, as s3's `test_ug.py` picks it.
* MIRAGE medical QA (`Teddy-XiongGZ/MIRAGE`'s `benchmark.json`, `{set: {id: {"question", "options",
  "answer"}}}`): `medqa`, `medmcqa`, `pubmedqa`, `bioasq`, `mmlu`, read from `evaluate.mirage_file`. As s3's
  `process_mirage.py` builds them (s3_protocol.md §2.1): the options are written into the question,
  `"{question}\\nOptions:\\nA: ...\\nB: ...\\n"`, and the gold answer is `"{key}: {option text}"`. They are
  scored by the MIRAGE judge alone, and retrieval sees only the text before `\\nOptions:`.
* the embedded sets: `fanout`, `trivia` (test splits of the offline assets).
* any `.jsonl` / `.parquet` QA file (FlashRAG rows, or s3's verl parquet), as `PATH` or `NAME=PATH`; rows
  keep their own `data_source` (one file may hold several), else take NAME (default: the file's stem).

Results are grouped by `data_source`, which for the named sets is the set's name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from s3_jax import assets
from s3_jax.data.qa import QAExample, normalize_question, read_qa

FLASHRAG_SETS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
FLASHRAG_SPLITS = ("test", "dev", "train")
MIRAGE_SETS = ("medqa", "medmcqa", "pubmedqa", "bioasq", "mmlu")
EMBEDDED_SETS = {"fanout": "asset:qa-fanout/test.jsonl", "trivia": "asset:qa-trivia/test.jsonl"}
OPTIONS_MARK = "\nOptions:"


@dataclasses.dataclass
class EvalSet:
  name: str
  path: str
  examples: list[QAExample]


def is_medical(example: QAExample) -> bool:
  """MIRAGE questions are judged by the MIRAGE evaluator alone (s3_protocol.md §3.2)."""
  return example.data_source in MIRAGE_SETS


def retrieval_query(question: str) -> str:
  """What static retrieval searches for: the question without its multiple-choice options (s3_protocol.md
  §7)."""
  return question.split(OPTIONS_MARK, 1)[0].strip()


def default_flashrag_dir() -> Path:
  return assets.cache_dir() / "flashrag"


def default_mirage_file() -> Path:
  return assets.cache_dir() / "mirage" / "benchmark.json"


def flashrag_file(folder: str | os.PathLike, name: str) -> Path:
  """`{folder}/{name}/{test|dev|train}.jsonl`, the first that exists."""
  tried = [Path(folder) / name / f"{split}.jsonl" for split in FLASHRAG_SPLITS]
  for path in tried:
    if path.is_file():
      return path
  raise FileNotFoundError(f"FlashRAG set {name!r}: none of {', '.join(map(str, tried))} exists. Download "
                          f"RUC-NLPIR/FlashRAG_datasets (huggingface) into {folder} or set "
                          f"evaluate.flashrag_dir")


def mirage_question(question: str, options: dict[str, str]) -> str:
  return f"{question}{OPTIONS_MARK}\n" + "".join(f"{key}: {text}\n" for key, text in options.items())


def read_mirage(path: str | os.PathLike, name: str) -> list[QAExample]:
  """One MIRAGE set from `benchmark.json`, options in the question and `"{key}: {text}"` as the answer."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"MIRAGE set {name!r}: {path} not found. Download benchmark.json from "
                            f"github.com/Teddy-XiongGZ/MIRAGE or set evaluate.mirage_file")
  try:
    benchmark = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(benchmark, dict) or name not in benchmark:
    have = sorted(benchmark) if isinstance(benchmark, dict) else type(benchmark).__name__
    raise ValueError(f"{path}: no MIRAGE set {name!r} (it has {have})")
  examples = []
  for qid, row in benchmark[name].items():
    where = f"{path}: {name}/{qid}"
    if not isinstance(row, dict) or not {"question", "options", "answer"} <= set(row):
      raise ValueError(f"{where}: expected an object with question, options and answer")
    options = row["options"]
    if not isinstance(options, dict) or not options or row["answer"] not in options:
      raise ValueError(f"{where}: answer {row['answer']!r} is not one of the options {options!r}")
    question = normalize_question(mirage_question(row["question"], options))
    gold = f"{row['answer']}: {options[row['answer']]}"
    examples.append(QAExample(id=f"{name}_{qid}", question=question, golden_answers=(gold,),
                              data_source=name))
  return examples


def load_set(spec: str, config: Any) -> EvalSet:
  """One set from its name, `PATH` or `NAME=PATH` (see the module docstring)."""
  name, sep, file = spec.partition("=")
  if not sep:
    name, file = spec, ""
  name = name.strip()
  ev = config.evaluate
  if not file and name in EMBEDDED_SETS:
    file = EMBEDDED_SETS[name]
    path = assets.resolve(file)
    examples = read_qa(path)
  elif not file and name in FLASHRAG_SETS:
    path = flashrag_file(ev.flashrag_dir or default_flashrag_dir(), name)
    examples = read_qa(path, default_source=name)
  elif not file and name in MIRAGE_SETS:
    path = Path(ev.mirage_file or default_mirage_file())
    examples = read_mirage(path, name)
  else:
    file = file or name
    if not file.startswith("asset:") and not Path(file).suffix:
      raise ValueError(f"dataset {spec!r}: not a known set ({', '.join(known_sets())}) and not a .jsonl or "
                       f".parquet file")
    path = assets.resolve(file) if file.startswith("asset:") else Path(file)
    name = name if sep else Path(path).stem
    examples = read_qa(path, default_source=name)
  if not examples:
    raise ValueError(f"dataset {spec!r}: {path} holds no questions")
  seen: set[tuple[str, str]] = set()
  for ex in examples:
    if (ex.data_source, ex.id) in seen:
      raise ValueError(f"dataset {spec!r}: {path} has the id {ex.id!r} twice in data source "
                       f"{ex.data_source!r}; ids must be unique (predictions are keyed by them)")
    seen.add((ex.data_source, ex.id))
  return EvalSet(name, str(path), examples)


def known_sets() -> list[str]:
  return [*EMBEDDED_SETS, *FLASHRAG_SETS, *MIRAGE_SETS]


def sample_per_source(examples: Sequence[QAExample], n: int, seed: int) -> list[QAExample]:
  """At most `n` questions per data source (0 = all), drawn as s3's `test_s3_sampled.py` draws them:
  `DataFrame.sample(n, random_state=seed)` = `RandomState(seed).choice(len, n, replace=False)`, in that
  order."""
  if n <= 0:
    return list(examples)
  by_source: dict[str, list[QAExample]] = {}
  for ex in examples:
    by_source.setdefault(ex.data_source, []).append(ex)
  out = []
  for rows in by_source.values():
    if len(rows) <= n:
      out.extend(rows)
    else:
      out.extend(rows[i] for i in np.random.RandomState(seed).choice(len(rows), n, replace=False))
  return out


def load_sets(specs: str | Sequence[str], config: Any) -> list[EvalSet]:
  """The comma-separated sets, each sampled per `evaluate.sample` / `evaluate.sample_seed`."""
  if isinstance(specs, str):
    specs = [s.strip() for s in specs.split(",") if s.strip()]
  if not specs:
    raise ValueError("no datasets given (--datasets or evaluate.datasets)")
  sets = [load_set(spec, config) for spec in specs]
  for s in sets:
    s.examples = sample_per_source(s.examples, config.evaluate.sample, config.evaluate.sample_seed)
  return sets
