"""Scoring a whole rollout batch: one batched generator call for every answer that is not cached, span / EM /
F1 checks, one batched judge call for the answers whose span check failed, then the reward against the RAG
cache. s3 does this as a serial loop of blocking HTTP calls per trajectory (s3_protocol.md §3.1); here each
stage is one concurrent batch, and a content-addressed cache answers repeated contexts without any call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from s3_jax.data.corpus import Doc
from s3_jax.data.qa import normalize_question
from s3_jax.reward.answers import exact_match, f1, gold_list, span_match
from s3_jax.reward.cache import AnswerCache, content_key
from s3_jax.reward.gbr import REWARD_KINDS, AnswerScores, RagCache, reward
from s3_jax.reward.judge import ChatGenerator, judge, mirage_judge
from s3_jax.reward.prompts import PROMPT_VERSION, answer_messages, closed_book_messages
from s3_jax.search.formats import generator_context


@dataclasses.dataclass(frozen=True)
class RewardItem:
  """One trajectory to score: its question, gold answers and the documents D_s3 given to the generator.

  `golden_answers`: a tuple, list or numpy array of strings, or one bare string (`answers.gold_list`); kept as
  a tuple. `prompt`: "context" (s3's answer prompt with the documents) or "closed_book" (s3's zero-shot
  prompt, no documents). `scoring`: "genacc" (span check, else the judge) or "mirage" (medical multiple
  choice: the MIRAGE evaluator judge alone decides, s3_protocol.md §3.2). `context`: the generator's context
  string as is (the naive-RAG formats, `formats.rag_context`); None formats `docs` as D_s3
  (`generator_context`)."""

  data_source: str
  question: str
  golden_answers: tuple[str, ...]
  docs: tuple[Doc, ...]
  prompt: str = "context"
  scoring: str = "genacc"
  context: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "golden_answers", tuple(gold_list(self.golden_answers)))
    if self.prompt not in ("context", "closed_book"):
      raise ValueError(f"RewardItem.prompt={self.prompt!r} must be context or closed_book")
    if self.scoring not in ("genacc", "mirage"):
      raise ValueError(f"RewardItem.scoring={self.scoring!r} must be genacc or mirage")
    if self.prompt == "closed_book" and (self.docs or self.context):
      raise ValueError("a closed-book item has no documents")

  def context_text(self) -> str:
    """The context string the generator sees."""
    return self.context if self.context is not None else generator_context(self.docs)


@dataclasses.dataclass(frozen=True)
class RewardResult:
  reward: float
  answer: str
  scores: AnswerScores
  rag_genacc: bool | None
  cached: bool
  finish_reason: str


@dataclasses.dataclass
class RewardStats:
  """Counters since construction (the metrics read and reset them per step with `take`)."""

  items: int = 0
  cache_hits: int = 0
  generator_calls: int = 0
  judge_calls: int = 0
  prompt_too_long: int = 0
  generate_seconds: float = 0.0
  judge_seconds: float = 0.0

  def take(self) -> dict[str, float]:
    out = dataclasses.asdict(self)
    out["cache_hit_rate"] = self.cache_hits / self.items if self.items else 0.0
    for field in dataclasses.fields(self):
      setattr(self, field.name, field.default)
    return out


class RewardScorer:
  """`score(items) -> list[RewardResult]`.

  `generator`: the answer model (a `GeneratorClient` or an in-process backend wrapper) with
  `complete(chats, temperature=, top_p=, max_tokens=)`; `judge_generator` defaults to it (s3's training
  judges with the same server), and an unclear verdict is asked once more of `judge_retry` (default: the
  answer generator, as s3 retries on its default Qwen model whichever judge asked first). `generator_id` and
  `judge_id` name the models in the cache key, so changing either never reuses another model's scores.
  `use_judge=False` scores GenAcc as the span check alone.
  """

  def __init__(self, generator: Any, *, generator_id: str, kind: str = "paper",
               rag_cache: RagCache | None = None, use_judge: bool = True,
               judge_generator: ChatGenerator | None = None, judge_id: str = "",
               judge_retry: ChatGenerator | None = None, cache: AnswerCache | None = None,
               max_tokens: int | None = None):
    if kind not in REWARD_KINDS:
      raise ValueError(f"reward.kind={kind!r} must be one of {REWARD_KINDS}")
    if kind in ("paper", "code") and rag_cache is None:
      raise ValueError(f"reward.kind={kind!r} compares against naive RAG and needs a RAG cache "
                       "(python -m s3_jax.precompute)")
    self.generator, self.generator_id, self.kind, self.rag_cache = generator, generator_id, kind, rag_cache
    self.use_judge, self.judge_generator = use_judge, judge_generator or generator
    self.judge_retry = judge_retry or generator
    if judge_generator is not None and not judge_id:
      raise ValueError("a separate judge needs a judge_id naming it (it keys the answer cache)")
    self.judge_id = (judge_id or f"{generator_id} (the generator)") if use_judge else "off (span check only)"
    self.cache = cache if cache is not None else AnswerCache()
    self.max_tokens = max_tokens
    self.stats = RewardStats()

  def _key(self, item: RewardItem, context: str) -> str:
    variant = {} if (item.prompt, item.scoring) == ("context", "genacc") else {
        "answer_prompt": item.prompt, "scoring": item.scoring}  # keys of plain items stay as they were
    return content_key(question=normalize_question(item.question), context=context,
                       golden_answers=list(item.golden_answers), generator=self.generator_id,
                       prompt=PROMPT_VERSION, judge=self.judge_id, max_tokens=self.max_tokens, **variant)

  def score_answers(self, answers: Sequence[str], golden_answers: Sequence[Sequence[str]],
                    questions: Sequence[str] | None = None,
                    mirage: Sequence[bool] | None = None) -> list[AnswerScores]:
    """Span, EM and F1 of each answer; the judge (one batched call) only where the span check failed. Items
    flagged in `mirage` (their `questions` needed) are judged by the MIRAGE evaluator alone: GenAcc is its
    verdict, whatever the span check says."""
    mirage = list(mirage) if mirage is not None else [False] * len(answers)
    if any(mirage) and not self.use_judge:
      raise ValueError("medical (MIRAGE) questions are scored by the judge alone: set reward.use_judge=True")
    spans = [span_match(a, g) for a, g in zip(answers, golden_answers, strict=True)]
    verdicts: list[bool | None] = [None] * len(answers)
    ask = [i for i, s in enumerate(spans) if not s and not mirage[i]] if self.use_judge else []
    medical = [i for i, m in enumerate(mirage) if m]
    start = time.perf_counter()
    if ask:
      for i, v in zip(ask, judge(self.judge_generator, [answers[i] for i in ask],
                                 [golden_answers[i] for i in ask], retry_generator=self.judge_retry),
                      strict=True):
        verdicts[i] = v
    if medical:
      for i, v in zip(medical, mirage_judge(self.judge_generator, [questions[i] for i in medical],
                                            [answers[i] for i in medical],
                                            [golden_answers[i] for i in medical]), strict=True):
        verdicts[i] = v
    if ask or medical:
      self.stats.judge_seconds += time.perf_counter() - start
      self.stats.judge_calls += len(ask) + len(medical)
    return [AnswerScores(span=s, em=exact_match(a, g), f1=f1(a, g), judge=v,
                         genacc=bool(v) if m else s or bool(v))
            for a, g, s, v, m in zip(answers, golden_answers, spans, verdicts, mirage, strict=True)]

  def rewards(self, items: Sequence[RewardItem]) -> list[RewardResult]:
    """Each item's answer (the generator's, or the cache's), its scores and its reward of this scorer's
    `kind`, in order; a context repeated in `items` is answered once."""
    contexts = [item.context_text() for item in items]
    keys = [self._key(item, context) for item, context in zip(items, contexts, strict=True)]
    known = self.cache.get_many(sorted(set(keys)))
    self.stats.items += len(items)
    self.stats.cache_hits += sum(k in known for k in keys)
    hits = set(known)
    first: dict[str, int] = {}  # each distinct missing context is generated once, even if repeated
    for i, k in enumerate(keys):
      if k not in hits:
        first.setdefault(k, i)
    missing = list(first.values())
    if missing:
      start = time.perf_counter()
      completions = self.generator.complete(
          [closed_book_messages(normalize_question(items[i].question)) if items[i].prompt == "closed_book"
           else answer_messages(normalize_question(items[i].question), contexts[i]) for i in missing],
          temperature=0.0, top_p=1.0, max_tokens=self.max_tokens)
      self.stats.generate_seconds += time.perf_counter() - start
      self.stats.generator_calls += len(missing)
      self.stats.prompt_too_long += sum(c.finish_reason == "prompt_too_long" for c in completions)
      scores = self.score_answers([c.text for c in completions], [items[i].golden_answers for i in missing],
                                  [normalize_question(items[i].question) for i in missing],
                                  [items[i].scoring == "mirage" for i in missing])
      fresh = {keys[i]: {"answer": c.text, "finish_reason": c.finish_reason, "scores": s.as_dict()}
               for i, c, s in zip(missing, completions, scores, strict=True)}
      self.cache.put_many(fresh.items())
      known.update(fresh)
    results = []
    for item, key in zip(items, keys, strict=True):
      entry = known[key]
      scores = AnswerScores(**entry["scores"])
      rag = bool(self.rag_cache.get(item.data_source, item.question)["score"]) if self.rag_cache else None
      results.append(RewardResult(reward=reward(self.kind, scores, rag), answer=entry["answer"],
                                  scores=scores, rag_genacc=rag, cached=key in hits,
                                  finish_reason=entry["finish_reason"]))
    return results


# reward.judge.retry / evaluate.judge.retry: who is asked again about an unclear verdict.
JUDGE_RETRIES = ("generator", "judge")


def judge_from_config(section: Any, generator: Any, generator_id: str, where: str = "reward.judge"
                      ) -> dict[str, Any]:
  """The `judge_generator` / `judge_id` / `judge_retry` arguments of `RewardScorer` for a judge section
  (`reward.judge`, `evaluate.judge`): `backend` "same" judges with the answer generator; jax / vllm / openai
  reach the judge at `address` (a generator service) or run it in this process (`model`, and for openai
  `base_url` / `key_env`), loaded on its first verdict. `retry`: "generator" asks an unclear verdict once
  more of the answer generator (s3's rule), "judge" of the judge itself."""
  if section.backend == "same":
    return {}
  from s3_jax.services.generator_backends import LazyGenerator

  if section.address:
    from s3_jax.services.replicas import connect_generator

    judge_generator = LazyGenerator(lambda: connect_generator(section.address))
  else:
    from s3_jax.services.generator_backends import InProcessGenerator, backend_from_config

    judge_generator = LazyGenerator(lambda: InProcessGenerator(backend_from_config(section, where)))
  judge_id = f"{section.backend}:{section.model}" + (f" at {section.base_url}" if section.backend == "openai"
                                                      else "")
  if section.retry == "generator":
    judge_id += f"; unclear verdicts asked again of {generator_id}"
  return {"judge_generator": judge_generator, "judge_id": judge_id,
          "judge_retry": generator if section.retry == "generator" else judge_generator}


def generator_id(config: Any) -> str:
  """The answer generator's name in cache keys and tables; a jax generator in this process computing in
  bfloat16 is another generator (`@bfloat16`: its answers differ, so they never share cached entries)."""
  name = f"{config.generator.backend}:{config.generator.model}"
  section = config.generator
  if section.backend == "jax" and not section.address and section.get("compute_dtype",
                                                                        "float32") != "float32":
    from s3_jax.models import precision

    dtype = precision.resolve(section.compute_dtype)
    name += "" if dtype == "float32" else f"@{dtype}"
  return name


def scorer_from_config(config: Any, generator: Any, *, kind: str, cache: AnswerCache,
                       rag_cache: RagCache | None = None, judge: str = "reward") -> RewardScorer:
  """The scorer of a job: the configured generator, the judge of `config.<judge>.judge` ("reward" for
  training and the precompute, "evaluate" for evaluation), `reward.use_judge`, `generator.max_tokens`."""
  return RewardScorer(generator, generator_id=generator_id(config), kind=kind, rag_cache=rag_cache,
                      use_judge=config.reward.use_judge, cache=cache, max_tokens=config.generator.max_tokens,
                      **judge_from_config(config[judge].judge, generator, generator_id(config),
                                          f"{judge}.judge"))
