"""Evaluate s3 or a baseline over QA sets: one command, one pass, resumable (s3_protocol.md §8-9).

  python -m s3_jax.evaluate --config configs/NAME.py[:arg] --method METHOD [--checkpoint DIR]
      [--datasets a,b] [--runs N] --out DIR [--config.key=value ...]
  python -m s3_jax.evaluate --compare DIR1,DIR2,... --out DIR      # one table and chart over finished runs

METHOD: none | rag | s3 | ircot | search_o1 | search_r1 | deepretrieval (s3_jax/methods/). Each method
produces the documents for every question; the frozen generator (the config's `generator.*`: jax, vllm or
openai, a service address or embedded) answers from them with s3's prompt, and
every answer is scored the same way: span, EM, F1, the LLM judge where the span check fails (GenAcc =
span ∨ judge), MIRAGE sets by the MIRAGE judge alone. `--checkpoint` is the method's own model: the
searcher for `s3` (an HF folder or a training run's newest HF export; default `searcher.init_from`), the
policy for the agent baselines (default: the generator model itself).

DIR receives `predictions.jsonl` (a row per question and run), `summary.json`, `table.md`, `genacc.png`
(`s3_jax/report.py` says what each holds), `run.json` (what was evaluated, and with which config),
`timing.json` (this invocation's questions per second and where the time went) and `answers.sqlite` (the
generator's scored answers, so repeated contexts cost nothing). Work is appended every `evaluate.batch_size`
questions; rerunning the command continues where it stopped, and more datasets or runs can be added later.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from s3_jax import assets, config_lib, report
from s3_jax.data.eval_sets import EvalSet, is_medical, load_sets
from s3_jax.data.qa import QAExample
from s3_jax.methods.base import AgentLM, MethodOutput, TimedRetriever
from s3_jax.metrics import Stopwatch
from s3_jax.reward.cache import AnswerCache
from s3_jax.reward.scorer import RewardItem, RewardScorer, scorer_from_config

METHODS = ("none", "rag", "s3", "ircot", "search_o1", "search_r1", "deepretrieval")
AGENT_METHODS = ("ircot", "search_o1", "search_r1", "deepretrieval")


def evaluate(config: ml_collections.ConfigDict, method: str, out: str | Path, *,
             checkpoint: str | None = None, datasets: str | None = None, runs: int | None = None,
             show_progress: bool = True, log: Callable[[str], None] = print,
             services: Any = None) -> dict[str, Any]:
  """Runs (or resumes) one evaluation into `out`; returns its summary (also written to `summary.json`).
  `services`: running retriever/generator clients to use (`embedded.Services`); default: the config's own
  (`open_services`).

  Multi-host (every process calls it, after `sharding.maybe_initialize_distributed`): each chunk of
  questions is split into contiguous per-process shares, every process runs the method and the generator on
  its own, and process 0 gathers the rows and writes every output; what is left to do is what process 0's
  `predictions.jsonl` says."""
  import contextlib

  import jax
  from tqdm import tqdm

  from s3_jax import compile_cache
  from s3_jax import sharding as sharding_lib
  from s3_jax.services.connect import open_services

  if method not in METHODS:
    raise ValueError(f"--method {method!r} must be one of {', '.join(METHODS)}")
  if checkpoint and method in ("none", "rag"):
    raise ValueError(f"--method {method} has no model of its own: drop --checkpoint")
  runs = runs or config.evaluate.runs
  if runs < 1:
    raise ValueError(f"--runs {runs} must be at least 1")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  compile_cache.enable(config.compile_cache)
  sets = load_sets(datasets or config.evaluate.datasets or config.data.test, config)
  if not config.reward.use_judge and any(is_medical(ex) for s in sets for ex in s.examples):
    raise ValueError("MIRAGE sets are scored by the judge alone: set --config.reward.use_judge=True")
  index, count = jax.process_index(), jax.process_count()
  is_main = index == 0
  log = log if is_main else (lambda *_: None)
  record, problem = {}, ""
  if is_main:  # process 0 keeps the folder's record; the others write nothing here
    try:
      record = _check_record(out, method, checkpoint, config)
    except ValueError as e:
      problem = str(e)
  problem = sharding_lib.host_broadcast_object(problem)
  if problem:  # every process stops, not only process 0
    raise ValueError(problem)
  predictions = out / "predictions.jsonl"
  done = {tuple(key) for key in sharding_lib.host_broadcast_object(sorted(_done(predictions)))}
  todo = [(run, s, [ex for ex in s.examples if (ex.data_source, ex.id, run) not in done])
          for run in range(runs) for s in sets]
  remaining = sum(len(examples) for _, _, examples in todo)
  finished = sum(len(s.examples) for s in sets) * runs - remaining
  if finished:
    log(f"{out}: {finished} of {finished + remaining} predictions already done")

  watch, start = Stopwatch(), time.perf_counter()
  if remaining:
    opened = (contextlib.nullcontext(services) if services is not None
              else open_services(config, show_progress=show_progress, log=log))
    with opened as services:
      retriever = TimedRetriever(services.retriever, watch)
      model = _make_method(method, config, retriever, services, checkpoint, watch, log)
      record["label"] = model.label
      if is_main:
        (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
      scorer = scorer_from_config(config, services.generator, kind="genacc", judge="evaluate",
                                  cache=AnswerCache(out / sharding_lib.per_process_name("answers.sqlite")))
      count_tokens = _token_counter(config)
      watch.add("startup", time.perf_counter() - start)  # services, index, models: not per question
      progress = tqdm(total=remaining, desc=f"evaluate {method}", unit="q",
                      disable=not show_progress or not is_main, dynamic_ncols=True)
      with progress, open(predictions, "a", encoding="utf-8") if is_main else contextlib.nullcontext() as f:
        for run, eval_set, examples in todo:
          for first in range(0, len(examples), config.evaluate.batch_size):
            chunk = examples[first:first + config.evaluate.batch_size]
            mine = chunk[len(chunk) * index // count:len(chunk) * (index + 1) // count]
            rows = _evaluate_chunk(model, scorer, mine, run, _seed(config.evaluate.seed, run, mine[0]),
                                   count_tokens, eval_set) if mine else []
            rows = [row for share in sharding_lib.host_gather_objects(rows) for row in share]
            if is_main:
              for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
              f.flush()
            progress.update(len(chunk))
      generator_stats = scorer.stats.take()
    seconds = time.perf_counter() - start
    timing = {"method": method, "questions": remaining, "seconds": seconds,
              "questions_per_second": remaining / (seconds - watch.seconds["startup"]), **watch.seconds,
              "generate": generator_stats["generate_seconds"], "judge": generator_stats["judge_seconds"],
              "generator_calls": generator_stats["generator_calls"],
              "judge_calls": generator_stats["judge_calls"],
              "answer_cache_hit_rate": generator_stats["cache_hit_rate"]}
    for key in ("sample", "retrieve"):
      timing.setdefault(key, 0.0)
    timing["other"] = seconds - sum(timing[k] for k in ("startup", "sample", "retrieve", "generate", "judge"))
    if is_main:  # process 0's own timing (the others ran their shares alongside)
      (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
    rate = timing["questions_per_second"]
    log(f"{remaining} questions in {seconds:.1f} s ({rate:.2f} q/s after start-up): "
        + ", ".join(f"{k} {timing[k]:.1f} s" for k in ("startup", "sample", "retrieve", "generate", "judge",
                                                       "other")))
  summary = sharding_lib.host_broadcast_object(
      report.write_reports(out, record.get("label") or method) if is_main else None)
  log(f"wrote {out / 'summary.json'}, {out / 'table.md'}, {out / 'genacc.png'}")
  avg = summary["average"]
  log(f"{record.get('label') or method}: GenAcc {100 * avg['genacc']:.1f}%, EM {100 * avg['em']:.1f}% "
      f"(average over {len(summary) - 1} data source(s))")
  return summary


def _evaluate_chunk(model: Any, scorer: RewardScorer, examples: Sequence[QAExample], run: int, seed: int,
                    count_tokens: Callable[[str], int], eval_set: EvalSet) -> list[dict[str, Any]]:
  outputs: list[MethodOutput] = model.run(examples, seed=seed)
  if len(outputs) != len(examples):
    raise RuntimeError(f"method {model.name} returned {len(outputs)} outputs for {len(examples)} questions")
  items = [RewardItem(ex.data_source, ex.question, ex.golden_answers, tuple(o.docs),
                      prompt="closed_book" if o.closed_book else "context",
                      scoring="mirage" if is_medical(ex) else "genacc", context=o.context)
           for ex, o in zip(examples, outputs, strict=True)]
  results = scorer.rewards(items)
  rows = []
  for ex, o, item, result in zip(examples, outputs, items, results, strict=True):
    context = "" if o.closed_book else item.context_text()
    rows.append({"data_source": ex.data_source, "id": ex.id, "run": run, "question": ex.question,
                 "golden_answers": list(ex.golden_answers), "context": context,
                 "context_docs": len({(d.title, d.text) for d in o.docs}),
                 "context_tokens": count_tokens(context) if context else 0, "answer": result.answer,
                 "finish_reason": result.finish_reason,
                 "scores": {k: result.scores.as_dict()[k] for k in report.SCORE_KEYS},
                 "method": model.name, "dataset": eval_set.name, "generator": scorer.generator_id,
                 "judge": scorer.judge_id, "trace": o.trace})
  return rows


def _make_method(method: str, config: ml_collections.ConfigDict, retriever: TimedRetriever, services: Any,
                 checkpoint: str | None, watch: Stopwatch, log: Callable[[str], None]) -> Any:
  from s3_jax.methods.deepretrieval import DeepRetrieval
  from s3_jax.methods.ircot import IRCoT
  from s3_jax.methods.search_o1 import SearchO1
  from s3_jax.methods.search_r1 import SearchR1
  from s3_jax.methods.static import ClosedBook, NaiveRAG

  if method == "s3":
    from s3_jax import sharding as sharding_lib
    from s3_jax.methods.s3 import S3Searcher

    model = S3Searcher(config, retriever, checkpoint=checkpoint, watch=watch,
                       mesh=sharding_lib.rollout_mesh(dict(config.mesh)))
    log(f"searcher: {model.source}")
    return model
  if method in AGENT_METHODS:
    agent = _make_agent(config, checkpoint, services, watch)
    log(f"{method} reasons and searches with {agent.name}")
    agents = {"ircot": IRCoT, "search_o1": SearchO1, "search_r1": SearchR1, "deepretrieval": DeepRetrieval}
    return agents[method](config, retriever, agent)
  return {"none": ClosedBook, "rag": NaiveRAG}[method](config, retriever)


def _make_agent(config: ml_collections.ConfigDict, checkpoint: str | None, services: Any,
                watch: Stopwatch) -> AgentLM:
  """The agent baselines' LLM: the service at `evaluate.agent_address`, else `--checkpoint` loaded in process
  with `evaluate.agent_backend`, else the generator service itself."""
  if config.evaluate.agent_address:
    from s3_jax.services.replicas import connect_generator

    address = config.evaluate.agent_address
    return AgentLM(connect_generator(address, retry_seconds=config.services.retry_seconds),
                   f"the LLM at {address}", watch)
  if checkpoint:
    from s3_jax.models.searcher import resolve_checkpoint
    from s3_jax.services.generator_backends import InProcessGenerator, make_backend

    folder, description = resolve_checkpoint(checkpoint)
    return AgentLM(InProcessGenerator(make_backend(config.evaluate.agent_backend, str(folder))), description,
                   watch)
  return AgentLM(services.generator, f"the generator ({config.generator.model})", watch)


def _token_counter(config: ml_collections.ConfigDict) -> Callable[[str], int]:
  from s3_jax.models.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(assets.resolve(config.searcher.tokenizer))
  return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _seed(base: int, run: int, first: QAExample) -> int:
  """A chunk's sampling seed: a function of the run and its first question, not of where an interrupted
  evaluation resumed."""
  digest = hashlib.sha256(f"{base}/{run}/{first.data_source}/{first.id}".encode()).digest()
  return int.from_bytes(digest[:4], "big") >> 1


def _done(predictions: Path) -> set[tuple[str, str, int]]:
  if not predictions.is_file():
    return set()
  return {(row["data_source"], row["id"], int(row["run"])) for row in report.read_predictions(predictions)}


_FREE_KEYS = ("evaluate.datasets", "evaluate.runs", "evaluate.batch_size", "evaluate.flashrag_dir",
              "evaluate.mirage_file", "retriever.address", "generator.address", "evaluate.agent_address",
              "evaluate.judge.address", "reward.judge.address")
# Keys an evaluation never reads (training's, and how long clients retry): a resumed evaluation may differ in
# them, e.g. after a learning-rate change of the config between sessions.
_FREE_PREFIXES = ("ppo.", "checkpoint.", "wandb.", "services.", "critic.", "total_steps", "compile_cache")


def _free(key: str) -> bool:
  return key in _FREE_KEYS or key.startswith(_FREE_PREFIXES)


def _check_record(out: Path, method: str, checkpoint: str | None,
                  config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`run.json`: what this folder evaluates. A rerun must evaluate the same thing (datasets and runs may
  grow; where the services run may change), so predictions of different setups never mix."""
  record = {"method": method, "checkpoint": checkpoint or "",
            "config": json.loads(config.to_json_best_effort(sort_keys=True))}
  path = out / "run.json"
  if path.is_file():
    before = json.loads(path.read_text())
    if (before["method"], before["checkpoint"]) != (method, record["checkpoint"]):
      raise ValueError(f"{out} holds an evaluation of --method {before['method']} "
                       f"--checkpoint {before['checkpoint'] or '(none)'}; use another --out")
    old, new = config_lib.flatten_record(before["config"]), config_lib.flatten(record["config"])
    # A key only the old record has is one the config no longer defines (retired; nothing reads it).
    changed = sorted(k for k in new if old.get(k) != new[k] and not _free(k))
    if changed:
      raise ValueError(f"{out} was evaluated with a different config ("
                       + ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed)
                       + "); use another --out")
    record["label"] = before.get("label", "")
  else:
    path.write_text(json.dumps(record, indent=2) + "\n")
  return record


def compare(dirs: Sequence[str | Path], out: str | Path) -> Path:
  """One Table-1 table (`table.md`) and chart (`genacc.png`) over finished evaluation folders."""
  summaries, setups = {}, {}
  for d in map(Path, dirs):
    record = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
    label = record.get("label") or d.name
    if label in summaries:
      label = f"{label} [{d.name}]"
    rows = report.read_predictions(d / "predictions.jsonl")
    summaries[label], setups[label] = report.summarize(rows), report.scorers(rows)
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "table.md").write_text(report.table_markdown(summaries, title="Comparison", setups=setups))
  report.plot_summaries(summaries, out / "genacc.png", title="GenAcc by data source")
  (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
  return out / "table.md"


def cli(argv: Sequence[str] | None = None) -> None:
  from absl import app, flags

  from s3_jax import cli as cli_lib

  config_flag = cli_lib.config_flag(required=False)  # not with --compare
  method_flag = flags.DEFINE_enum("method", None, METHODS, "what to evaluate")
  checkpoint_flag = flags.DEFINE_string("checkpoint", None, "the method's model: HF folder, asset:NAME, or a "
                                                            "training run (its newest HF export)")
  datasets_flag = flags.DEFINE_string("datasets", None, "comma-separated set names or QA files (default: "
                                                        "evaluate.datasets, else data.test)")
  runs_flag = flags.DEFINE_integer("runs", None, "runs per question (default: evaluate.runs)")
  out_flag = flags.DEFINE_string("out", None, "output folder")
  compare_flag = flags.DEFINE_list("compare", None, "finished evaluation folders to tabulate together")
  flags.mark_flag_as_required("out")

  def body(config: ml_collections.ConfigDict | None) -> None:
    import jax

    from s3_jax import sharding as sharding_lib

    sharding_lib.maybe_initialize_distributed()  # multi-host: before any other JAX call
    if compare_flag.value:
      print(compare(compare_flag.value, out_flag.value).read_text())
      return
    if config is None or method_flag.value is None:
      raise app.UsageError("--config and --method are required (or --compare DIR,...)")
    evaluate(config, method_flag.value, out_flag.value, checkpoint=checkpoint_flag.value,
             datasets=datasets_flag.value, runs=runs_flag.value)
    if jax.process_index() == 0:
      print((Path(out_flag.value) / "table.md").read_text())

  cli_lib.run(body, config_flag, argv=argv,
              errors=(ValueError, FileNotFoundError, KeyError, assets.AssetError))


if __name__ == "__main__":
  cli()
