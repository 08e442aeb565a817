"""Naive-RAG precompute (s3_protocol.md §3.3): the baseline every Gain-Beyond-RAG reward compares against.

  python -m s3_jax.precompute --config configs/NAME.py[:arg] [--config.key=value ...] [--out DIR]

For every question of the configured splits: top-`precompute.retrieval_topk` (12) retrieval, the generator's
answer on the top `precompute.context_docs` (3) in the format `reward.rag_context_format` says ("s3": the
one-line format s3's RAG cache was answered from; "d_s3": the D_s3 context format), its GenAcc and EM.
Writes, in `precompute.dir` (default `$S3_JAX_CACHE/precompute/<hash of the settings>`):

  rag_cache.json          {data_source: {question: {"answer", "score", "em_score"}}} (s3's layout)
  retrieval_<split>.jsonl one row per question: data_source, question, the top-12 docs with scores
  train_filtered.jsonl    the training questions s3 keeps: no yes/no/true/false gold answer, and naive RAG
                          does not already answer them
  stats.json              counts before and after filtering; the generator's work, per run and summed
  answers.sqlite          the scored-answer cache (shared with the training reward)
  settings.json           what the results depend on (`settings`): a folder made under other settings (another
                          context format, generator, judge or prompt version) is stale, and is recomputed

Work is saved every `precompute.chunk_size` questions; rerunning after an interruption skips the questions
already done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from s3_jax import assets, config_lib
from s3_jax.data.corpus import Doc
from s3_jax.data.qa import QAExample, read_qa
from s3_jax.reward.cache import AnswerCache
from s3_jax.reward.gbr import RagCache
from s3_jax.reward.prompts import PROMPT_VERSION
from s3_jax.reward.scorer import RewardItem, scorer_from_config
from s3_jax.search.formats import rag_context
from s3_jax.services.generator_backends import LazyGenerator

YES_NO = frozenset(("yes", "no", "true", "false", "Yes", "No", "True", "False"))


def _service_settings(section: ml_collections.ConfigDict) -> dict[str, Any]:
  """A generator or judge section without what changes no answer (where the service runs)."""
  out = section.to_dict()
  for key in ("address", "key_env") + (("base_url",) if out.get("backend") != "openai" else ()):
    out.pop(key, None)
  return out


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Everything the precompute's results depend on (it names the default folder and is `settings.json`)."""
  out = {"data": {k: str(config.data[k]) for k in ("train", "test", "corpus", "corpus_limit")},
         "retriever": config.retriever.to_dict(), "generator": _service_settings(config.generator),
         "topk": config.precompute.retrieval_topk, "context": config.precompute.context_docs,
         "rag_context_format": config.reward.rag_context_format, "use_judge": config.reward.use_judge,
         "judge": _service_settings(config.reward.judge), "prompt": PROMPT_VERSION}
  out["retriever"].pop("address", None)
  return out


def precompute_dir(config: ml_collections.ConfigDict) -> Path:
  """Where the precompute of this config lives: `precompute.dir`, or a cache folder named by a hash of
  everything its results depend on."""
  if config.precompute.dir:
    return Path(config.precompute.dir).expanduser()
  digest = hashlib.sha256(json.dumps(settings(config), sort_keys=True).encode()).hexdigest()[:16]
  return assets.cache_dir() / "precompute" / digest


_DERIVED = ("rag_cache.json", "retrieval_train.jsonl", "retrieval_test.jsonl", "train_filtered.jsonl",
            "stats.json")


def _refresh(out: Path, wanted: dict[str, Any], log: Callable[[str], None]) -> None:
  """Makes `out` hold results of `wanted`: a folder whose `settings.json` differs (or that has results but no
  `settings.json`, from before it was written) is stale — its results are removed, saying why, and recomputed.
  The scored-answer cache stays: its keys hold the context string, generator, judge and prompt version."""
  path = out / "settings.json"
  found = [name for name in _DERIVED if (out / name).exists()]
  before = json.loads(path.read_text()) if path.is_file() else None
  if found and before != wanted:
    if before is None:
      why = "it has no settings.json (made before the RAG context format was recorded)"
    else:
      flat_before, flat_now = config_lib.flatten(before), config_lib.flatten(wanted)
      why = ", ".join(f"{k}: {flat_before.get(k)} -> {flat_now.get(k)}" for k in sorted(flat_before.keys()
                      | flat_now.keys()) if flat_before.get(k) != flat_now.get(k))
    log(f"precompute in {out} is stale ({why}); recomputing the naive-RAG baseline")
    for name in found:
      (out / name).unlink()
  path.write_text(json.dumps(wanted, indent=2, sort_keys=True) + "\n")


def make_retriever(config: ml_collections.ConfigDict, show_progress: bool = True) -> Any:
  """The configured retriever service, or (no address) an index of the configured corpus in process."""
  if config.retriever.address:
    from s3_jax.services.replicas import connect_retriever

    return connect_retriever(config.retriever.address, retry_seconds=config.services.retry_seconds)
  from s3_jax.retrieval.index_dir import ensure_config_index, load_retriever

  return load_retriever(ensure_config_index(config, show_progress))


def make_generator(config: ml_collections.ConfigDict) -> Any:
  """The configured generator service, or (no address) the backend in process."""
  if config.generator.address:
    from s3_jax.services.replicas import connect_generator

    return connect_generator(config.generator.address, retry_seconds=config.services.retry_seconds)
  from s3_jax.services.generator_backends import InProcessGenerator, backend_from_config

  return InProcessGenerator(backend_from_config(config.generator))


def keep_for_training(example: QAExample, rag_cache: RagCache) -> bool:
  """s3's `filter_fn`: no gold answer is literally yes/no/true/false, and naive RAG got it wrong."""
  if any(answer in YES_NO for answer in example.golden_answers):
    return False
  return not rag_cache.get(example.data_source, example.question)["score"]


def _read_retrieval(path: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
  done: dict[tuple[str, str], list[dict[str, Any]]] = {}
  if path.is_file():
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          done[(row["data_source"], row["question"])] = row["docs"]
  return done


def _reward_totals(path: Path, this_run: dict[str, Any]) -> dict[str, Any]:
  """The generator's work recorded in `stats.json`: `reward_runs`, one entry per finished run (a resumed run
  adds its own; one that finds everything done adds zeros), and `reward`, their sums. So rerunning a finished
  precompute keeps the record of the run that did the work instead of overwriting it with zeros."""
  before = json.loads(path.read_text()) if path.exists() else {}
  # a record written before `reward_runs` existed holds one run's work in `reward`
  runs = [*before.get("reward_runs", [before["reward"]] if "reward" in before else []), this_run]
  total = {k: sum(run.get(k, 0) for run in runs) for k in this_run if k != "cache_hit_rate"}
  total["cache_hit_rate"] = total["cache_hits"] / total["items"] if total.get("items") else 0.0
  return {"reward": total, "reward_runs": runs}


def run_precompute(config: ml_collections.ConfigDict, out: Path | None = None, retriever: Any = None,
                   generator: Any = None, show_progress: bool = True, log=print) -> dict[str, Any]:
  """Runs (or resumes) the precompute; returns the stats it also writes to `stats.json`.

  Multi-host (every process calls it): each chunk of questions is split into contiguous per-process shares,
  every process retrieves and answers its own, and the rows are gathered in question order; process 0
  writes the folder (or, when the processes do not share it, every process writes its own identical copy).
  The work left to do is what process 0's files say."""
  import jax
  from tqdm import tqdm

  from s3_jax import compile_cache
  from s3_jax import sharding as sharding_lib
  from s3_jax.reward.gbr import AnswerScores

  out = Path(out) if out is not None else precompute_dir(config)
  out.mkdir(parents=True, exist_ok=True)
  compile_cache.enable(config.compile_cache)
  index, count = jax.process_index(), jax.process_count()
  shared = sharding_lib.shared_folder(out)  # a collective: every process asks
  writes = index == 0 or not shared
  log = log if index == 0 else (lambda *_: None)
  if writes:
    _refresh(out, settings(config), log)
  sharding_lib.host_barrier("precompute-settings")
  cache_path = out / "rag_cache.json"
  rag_cache = RagCache.load(cache_path) if cache_path.is_file() else RagCache(path=cache_path)
  retriever = retriever if retriever is not None else make_retriever(config, show_progress)
  # Loaded on first use, so a finished precompute reruns in seconds.
  generator = generator if generator is not None else LazyGenerator(lambda: make_generator(config))
  scorer = scorer_from_config(config, generator, kind="genacc",
                              cache=AnswerCache(out / sharding_lib.per_process_name("answers.sqlite")))
  context_format = config.reward.rag_context_format
  topk, context_docs, chunk = (config.precompute.retrieval_topk, config.precompute.context_docs,
                               config.precompute.chunk_size)
  stats: dict[str, Any] = {"dir": str(out)}
  for split in [s.strip() for s in config.precompute.splits.split(",") if s.strip()]:
    if split not in ("train", "test"):
      raise ValueError(f"precompute.splits: {split!r} must be train or test")
    examples = read_qa(assets.resolve(config.data[split]))
    limit = config.data[f"{split}_limit"]
    examples = examples[:limit] if limit else examples
    retrieval_path = out / f"retrieval_{split}.jsonl"
    retrieved = _read_retrieval(retrieval_path)
    todo = sharding_lib.host_broadcast_object(
        [i for i, ex in enumerate(examples) if (ex.data_source, ex.question) not in retrieved
         or (ex.data_source, ex.question) not in rag_cache])
    todo = [examples[i] for i in todo]
    if len(todo) < len(examples):
      log(f"precompute {split}: {len(examples) - len(todo)} of {len(examples)} questions already done "
          f"in {out}")
    progress = tqdm(total=len(todo), desc=f"naive RAG ({split})", unit="q",
                    disable=not show_progress or index != 0)
    with progress, open(retrieval_path, "a", encoding="utf-8") if writes else _NoFile() as retrieval_file:
      for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        mine = batch[len(batch) * index // count:len(batch) * (index + 1) // count]
        results = retriever.search([ex.question for ex in mine], topk) if mine else []
        scored = scorer.rewards([RewardItem(ex.data_source, ex.question, ex.golden_answers,
                                          tuple(docs[:context_docs]),
                                          context=rag_context(docs, context_docs, context_format))
                               for ex, docs in zip(mine, results, strict=True)])
        rows = [([_doc_row(d) for d in docs], result.answer, result.scores.as_dict())
                for docs, result in zip(results, scored, strict=True)]
        rows = [row for share in sharding_lib.host_gather_objects(rows) for row in share]
        for ex, (docs, answer, scores) in zip(batch, rows, strict=True):
          retrieval_file.write(json.dumps({"data_source": ex.data_source, "question": ex.question,
                                           "docs": docs}, ensure_ascii=False) + "\n")
          rag_cache.put(ex.data_source, ex.question, answer, AnswerScores(**scores))
        retrieval_file.flush()
        if writes:
          rag_cache.save()
        progress.update(len(batch))
    answered = sum(rag_cache.get(ex.data_source, ex.question)["score"] for ex in examples)
    stats[split] = {"questions": len(examples), "naive_rag_genacc": answered / max(len(examples), 1)}
    if split == "train":
      kept = [ex for ex in examples if keep_for_training(ex, rag_cache)]
      if writes:
        _write_qa(out / "train_filtered.jsonl", kept)
      stats["train"].update({"kept": len(kept), "dropped_yes_no": sum(
          any(a in YES_NO for a in ex.golden_answers) for ex in examples), "dropped_rag_correct": answered})
      log(f"train: {len(examples)} questions -> {len(kept)} kept for training "
          f"(naive RAG already answers {answered}; yes/no-type {stats['train']['dropped_yes_no']})")
  stats.update(_reward_totals(out / "stats.json", scorer.stats.take()))  # this process's share
  if writes:
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
  sharding_lib.host_barrier("precompute-written")
  return stats


class _NoFile:
  """Stands in for a file that this process does not write (another process writes the shared one)."""

  def __enter__(self) -> _NoFile:
    return self

  def __exit__(self, *exc: Any) -> None:
    return None

  def write(self, text: str) -> None:
    pass

  def flush(self) -> None:
    pass


def _doc_row(doc: Doc) -> dict[str, Any]:
  return {"id": doc.id, "title": doc.title, "text": doc.text, "score": doc.score}


def _write_qa(path: Path, examples: Sequence[QAExample]) -> None:
  tmp = path.with_suffix(".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps({"id": ex.id, "question": ex.question, "golden_answers": list(ex.golden_answers),
                          "data_source": ex.data_source}, ensure_ascii=False) + "\n")
  tmp.replace(path)


def main() -> None:
  from absl import flags

  from s3_jax import cli as cli_lib

  config_flag = cli_lib.config_flag()
  out_flag = flags.DEFINE_string("out", None, "output folder (default: precompute.dir or a cache folder)")

  def body(config: ml_collections.ConfigDict) -> None:
    import jax

    from s3_jax import sharding as sharding_lib

    sharding_lib.maybe_initialize_distributed()  # multi-host: before any other JAX call
    stats = run_precompute(config, out_flag.value)
    if jax.process_index() == 0:
      print(json.dumps(stats, indent=2))

  cli_lib.run(body, config_flag, errors=(ValueError, FileNotFoundError, KeyError, assets.AssetError))


if __name__ == "__main__":
  main()
