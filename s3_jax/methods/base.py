"""What every evaluation method shares: its output (the documents handed to the generator), the timed
retriever and the LLM ("agent") the multi-turn baselines reason and search with.

A method is an object with `name`, `label` (its row name in the tables) and
`run(examples, seed) -> list[MethodOutput]`, one output per question, in order. The harness
(`s3_jax.evaluate`) then has the frozen generator answer from each output's documents and scores the answer
the same way for every method.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from s3_jax.data.corpus import Doc
from s3_jax.metrics import Stopwatch


@dataclasses.dataclass
class MethodOutput:
  """`docs`: the generator's context, in order (the harness formats and de-duplicates them as s3 does);
  `context`: the context string as is instead of that format (naive RAG in s3's RAG-cache format);
  `closed_book`: answer with s3's zero-shot prompt instead (no documents); `trace`: what the method did
  (queries, turns, its own answer, ...), written into predictions.jsonl as is."""

  docs: list[Doc]
  closed_book: bool = False
  context: str | None = None
  trace: dict[str, Any] = dataclasses.field(default_factory=dict)


class TimedRetriever:
  """A retriever whose `search` time goes into `watch`'s "retrieve"."""

  def __init__(self, retriever: Any, watch: Stopwatch):
    self.retriever, self.watch = retriever, watch

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    if not queries:
      return []
    with self.watch("retrieve"):
      return self.retriever.search(list(queries), k)


@dataclasses.dataclass(frozen=True)
class AgentSampling:
  temperature: float
  top_p: float
  max_tokens: int


class AgentLM:
  """The LLM a baseline reasons and searches with: any generator with `complete(chats, temperature=,
  top_p=, max_tokens=, stop=, seed=)` (the gRPC `GeneratorClient`, or an in-process backend). A chat ending
  with an assistant message is continued (the agent's own text, with tool results appended to it). Its time
  goes into `watch`'s "sample"."""

  def __init__(self, generator: Any, name: str, watch: Stopwatch):
    self.generator, self.name, self.watch = generator, name, watch

  def complete(self, chats: Sequence[list[dict[str, str]]], sampling: AgentSampling, *,
               stop: Sequence[str] = (), seed: int = 0) -> list[Any]:
    if not chats:
      return []
    with self.watch("sample"):
      out = self.generator.complete(list(chats), temperature=sampling.temperature, top_p=sampling.top_p,
                                    max_tokens=sampling.max_tokens, stop=list(stop), seed=seed)
    if len(out) != len(chats):
      raise RuntimeError(f"agent {self.name}: {len(out)} completions for {len(chats)} chats")
    return out


def agent_sampling(config: Any, temperature: float, top_p: float, max_tokens: int) -> AgentSampling:
  """A method's own sampling defaults (s3_protocol.md §8), with `evaluate.agent_temperature` (>= 0) and
  `evaluate.agent_max_tokens` (> 0) overriding them."""
  ev = config.evaluate
  return AgentSampling(temperature=ev.agent_temperature if ev.agent_temperature >= 0 else temperature,
                       top_p=top_p, max_tokens=ev.agent_max_tokens or max_tokens)


def user_chat(text: str, assistant: str = "") -> list[dict[str, str]]:
  """A one-question chat, continuing the assistant's `assistant` text when there is some."""
  chat = [{"role": "user", "content": text}]
  return [*chat, {"role": "assistant", "content": assistant}] if assistant else chat


def close_open_tag(text: str, tags: Sequence[str]) -> str:
  """`text` with the closing tag appended when generation stopped inside the last opened of `tags` (the
  stop string itself is never part of a completion)."""
  opened = max(tags, key=lambda t: text.rfind(f"<{t}>"))
  start = text.rfind(f"<{opened}>")
  if start >= 0 and f"</{opened}>" not in text[start:]:
    return text + f"</{opened}>"
  return text


def strip_tags(text: str) -> str:
  """Text without XML-like tags and their `<search_complete>` verdicts, whitespace collapsed."""
  text = re.sub(r"<search_complete>.*?</search_complete>", " ", text, flags=re.DOTALL)
  return " ".join(re.sub(r"</?[a-z_|]+>", " ", text).split())
