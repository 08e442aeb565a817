"""The LLM judge (s3_protocol.md §3.2): s3's yes/no check for general QA and the MIRAGE evaluator for medical
QA.

Both take any generator with `generate(list_of_message_lists, temperature=, top_p=, max_tokens=) ->
list[str]` (the gRPC `GeneratorClient` or an in-process backend) and judge a whole batch in one call, then
retry only the replies that could not be parsed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from s3_jax.reward.answers import gold_list

Messages = list[dict[str, str]]


class ChatGenerator(Protocol):
  def generate(self, requests: Sequence[Messages], *, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int | None = None) -> list[str]: ...


def judge_messages(response: str, golden_answers: Sequence[str] | str) -> Messages:
  """s3's judge request: one user message, no system message; the gold answers as Python's `str(list)` (a
  bare string is one answer, `['Paris']`)."""
  return [{"role": "user", "content": (
      f"Please check if any of the golden answers is contained in the following response: {response}\n\n"
      f"Golden answers: {gold_list(golden_answers)!s}\n\nPlease directly answer with 'yes' or 'no'.")}]


def parse_judge_reply(reply: str) -> bool | None:
  """s3's rule: the lowercased reply contains "yes" -> True, else contains "no" -> False, else None."""
  lowered = reply.lower()
  if "yes" in lowered:
    return True
  if "no" in lowered:
    return False
  return None


def judge(generator: ChatGenerator, responses: Sequence[str], golden_answers: Sequence[Sequence[str]],
          retry_generator: ChatGenerator | None = None) -> list[bool]:
  """s3's judge_check for a batch: temperature 0, top-p 1, at most 10 new tokens; a reply that says neither
  yes nor no is asked once more (of `retry_generator` when given, as s3 retries on its default Qwen model),
  and counts as incorrect if it is still unclear."""
  requests = [judge_messages(r, g) for r, g in zip(responses, golden_answers, strict=True)]
  verdicts = [parse_judge_reply(r) for r in _ask(generator, requests)]
  unclear = [i for i, v in enumerate(verdicts) if v is None]
  if unclear:
    retried = _ask(retry_generator or generator, [requests[i] for i in unclear])
    for i, reply in zip(unclear, retried, strict=True):
      verdicts[i] = parse_judge_reply(reply)
  return [bool(v) for v in verdicts]


def _ask(generator: ChatGenerator, requests: list[Messages], max_tokens: int = 10) -> list[str]:
  if not requests:
    return []
  replies = generator.generate(requests, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
  if len(replies) != len(requests):
    raise RuntimeError(f"the judge returned {len(replies)} replies for {len(requests)} requests")
  return replies


# MIRAGE evaluator (s3's `scripts/evaluation/context_mirage.py`, `evaluate_answer`). The spec quotes its
# structure and criteria, not every word; this text follows that structure.
MIRAGE_PROMPT = """You are an evaluator for question-answering systems. Your task is to determine whether \
the RAG system's answer is correct, based on the golden answers.

Question: {question}

RAG System's Answer: {answer}

Golden Answers (reference): {golden_answers}

The answer is considered correct if it:
1. Contains the same key information as any of the golden answers
2. Expresses the same meaning, even if worded differently
3. Is factually consistent with the golden answers

Respond with ONLY "yes" if the answer is correct, or "no" if it is incorrect."""


def mirage_messages(question: str, answer: str, golden_answers: Sequence[str] | str) -> Messages:
  return [{"role": "user", "content": MIRAGE_PROMPT.format(
      question=question, answer=answer, golden_answers=", ".join(gold_list(golden_answers)))}]


def parse_mirage_reply(reply: str) -> bool | None:
  """Accepted only when the reply is exactly yes or no (case and surrounding space/period ignored)."""
  word = reply.strip().strip(".").strip().lower()
  return {"yes": True, "no": False}.get(word)


def mirage_judge(generator: ChatGenerator, questions: Sequence[str], answers: Sequence[str],
                 golden_answers: Sequence[Sequence[str]], retries: int = 3) -> list[bool]:
  """Judge-only scoring of medical QA: temperature 0, a reply that is not exactly yes/no is asked again up
  to `retries` times, then counts as incorrect."""
  requests = [mirage_messages(q, a, g) for q, a, g in zip(questions, answers, golden_answers, strict=True)]
  verdicts: list[Any] = [None] * len(requests)
  pending = list(range(len(requests)))
  for _ in range(retries + 1):
    replies = _ask(generator, [requests[i] for i in pending], max_tokens=10)
    for i, reply in zip(pending, replies, strict=True):
      verdicts[i] = parse_mirage_reply(reply)
    pending = [i for i in pending if verdicts[i] is None]
    if not pending:
      break
  return [bool(v) for v in verdicts]
