"""The batched multi-turn rollout (s3_protocol.md §2.3): every active episode samples one turn, the searching
ones share one `Retriever.search` call, observations are appended, and episodes end on `<search_complete>`,
after the last turn, or at the context cap.

Unlike s3, which decodes each turn, cuts it after `</query>` and re-tokenizes the text, an episode keeps the
token ids the policy actually sampled (cut at the token that completes `</query>`; EOS dropped, as s3's
decoding drops it) and the environment's tokens as they were inserted, so the trainer scores exactly the
sequence the sampler produced — no decode/re-encode drift.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from s3_jax import host_memory
from s3_jax.data.corpus import Doc
from s3_jax.data.qa import QAExample
from s3_jax.metrics import Stopwatch
from s3_jax.models.tokenizer import stop_prefix_length
from s3_jax.search import protocol
from s3_jax.search.formats import observation

# rollout.doc_extraction: how D_s3 is read (Episode.generator_docs); rollout.turn_semantics: what a turn
# counts (run_episodes). The config accepts the names from here.
DOC_EXTRACTIONS = ("safe", "faithful")
TURN_SEMANTICS = ("s3", "exact")


class Policy(Protocol):
  def sample(self, contexts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
             keys: Sequence[Any] | None = None) -> list[list[int]]:
    """One turn per context: the sampled token ids (stopping at `</query>` or EOS, or at the limit).
    `keys[i]` names context i's episode (the same key on every turn of one rollout), so a policy may keep
    each episode's KV cache between turns. A policy may also have `release()`, called when a rollout ends."""


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
  topk: int = 8
  max_select: int = 3
  max_turns: int = 3
  turn_semantics: str = "s3"  # s3: max_turns + 1 search rounds, then a final no-search turn | exact
  max_response_length: int = 500  # new tokens per turn
  max_obs_length: int = 1400  # tokens per observation
  max_prompt_length: int = 8000  # prompt + trajectory
  bm25: bool = False  # the prompt's Boolean-query note

  @classmethod
  def from_config(cls, config: Any) -> EpisodeConfig:
    r = config.rollout
    return cls(topk=r.topk, max_select=r.max_select, max_turns=r.max_turns, turn_semantics=r.turn_semantics,
               max_response_length=r.max_response_length, max_obs_length=r.max_obs_length,
               max_prompt_length=r.max_prompt_length, bm25=config.retriever.kind == "bm25")


@dataclasses.dataclass
class Episode:
  """One searcher trajectory. `ids` is everything after the prompt; `policy_mask[i]` says whether `ids[i]`
  was sampled by the policy (trained on) or inserted by the environment (never trained on)."""

  example: QAExample
  prompt_ids: list[int]
  blocks: list[list[Doc]]  # environment document blocks: 0 = the initial block, then one per search
  ids: list[int] = dataclasses.field(default_factory=list)
  policy_mask: list[bool] = dataclasses.field(default_factory=list)
  responses: list[str] = dataclasses.field(default_factory=list)  # each turn's text, as parsed
  response_blocks: list[int] = dataclasses.field(default_factory=list)  # the block each turn followed
  queries: list[str] = dataclasses.field(default_factory=list)
  invalid_actions: int = 0
  ended: str = ""  # complete | turns | cap

  @property
  def done(self) -> bool:
    return bool(self.ended)

  def append(self, ids: Sequence[int], from_policy: bool) -> None:
    self.ids.extend(ids)
    self.policy_mask.extend([from_policy] * len(ids))

  def selected_docs(self, max_select: int, selection: bool = True) -> list[Doc]:
    """D_s3 from the environment's own blocks (`protocol.extract_selected_docs_safe`); `selection=False`
    ("w/o selection") gives every document the environment showed."""
    if not selection:
      return protocol.extract_selected_docs_safe(self.blocks, [], max_select)
    return protocol.extract_selected_docs_safe(
        self.blocks, list(zip(self.response_blocks, self.responses, strict=True)), max_select)

  def generator_docs(self, mode: str, max_select: int, selection: bool = True,
                     tokenizer: Any = None) -> list[Doc]:
    """D_s3 as `rollout.doc_extraction` says: "safe" (the default) or "faithful" (s3's parser on the decoded
    trajectory; needs the tokenizer)."""
    if mode == "safe":
      return self.selected_docs(max_select, selection)
    if mode == "faithful":
      if not selection:
        raise ValueError("rollout.selection=False is defined on the environment's blocks: use "
                         "rollout.doc_extraction=safe")
      return protocol.extract_selected_docs_faithful(self.trajectory_text(tokenizer))
    raise ValueError(f"rollout.doc_extraction={mode!r} must be {' or '.join(DOC_EXTRACTIONS)}")

  def trajectory_text(self, tokenizer: Any) -> str:
    """The decoded prompt and trajectory, special tokens kept: the input of s3's faithful D_s3 parser."""
    return tokenizer.decode(self.prompt_ids + self.ids, skip_special_tokens=False)

  def docs_selected(self) -> int:
    """How many documents the searcher picked with `<important_info>` (the first tag after each block, ids
    within the block), before any cap."""
    picked = {}
    for b, text in zip(self.response_blocks, self.responses, strict=True):
      ids = protocol.selected_ids_in(text, len(self.blocks[b]))
      if ids is not None and b not in picked:
        picked[b] = len(ids)
    return sum(picked.values())

  def stats(self) -> dict[str, Any]:
    return {"turns": len(self.responses), "searches": len(self.queries),
            "docs_selected": self.docs_selected(), "invalid_actions": self.invalid_actions,
            "duplicate_queries": len(self.queries) - len(set(self.queries)),
            "context_tokens": len(self.prompt_ids) + len(self.ids), "policy_tokens": sum(self.policy_mask),
            "ended_by_completion": self.ended == "complete", "ended_by_cap": self.ended == "cap"}


class SamplerPolicy:
  """The searcher's `Policy` on this project's `Sampler`: one batched call per turn, stopping at `</query>`
  or EOS, with the rollout's temperature / top-p / top-k; a fresh RNG key per turn.

  `keep_cache=True` (`rollout.keep_cache`, the default) keeps each episode's KV cache between turns
  (`Sampler.session`) and prefills only what the environment appended; `False` re-prefills the whole context
  every turn (s3/verl's way; the reference the cached path is tested against)."""

  def __init__(self, sampler: Any, *, temperature: float, top_p: float, top_k: int = -1, seed: int = 0,
               rng: Any = None, keep_cache: bool = True):
    import jax

    from s3_jax.models.sampler import SamplingParams

    self.sampler = sampler
    self.params = SamplingParams(temperature=temperature, top_p=top_p, top_k=max(top_k, 0))
    self.rng = rng if rng is not None else jax.random.key(seed)
    self.keep_cache = keep_cache
    self._session = None

  def sample(self, contexts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
             keys: Sequence[Any] | None = None) -> list[list[int]]:
    import jax

    self.rng, rng = jax.random.split(self.rng)
    kwargs = {"max_new_tokens": max_new_tokens, "stop_strings": ("</query>",), "rng": rng}
    if not self.keep_cache or keys is None:
      tokens = self.sampler.generate(contexts, self.params, **kwargs).tokens
    else:
      if self._session is None:
        self._session = self.sampler.session()
      tokens = self._session.generate(keys, contexts, self.params, **kwargs).tokens
    host_memory.release()  # the last turn's caches and temporaries (`s3_jax.host_memory`)
    return tokens

  def release(self) -> None:
    """Frees the episodes' caches (the rollout ended)."""
    if self._session is not None:
      self._session.close()
    host_memory.release()


def initial_blocks(retrieved: Sequence[Sequence[Doc]], begin_with_search: bool,
                   initial_docs: int) -> list[list[Doc]]:
  """Each question's initial block from its naive-RAG retrieval (top 12 in the precompute): the first
  `initial_docs`, or none for the "w/o begin with search" ablation."""
  return [list(docs[:initial_docs]) if begin_with_search else [] for docs in retrieved]


def _cut_ids(tokenizer: Any, ids: Sequence[int], eos_ids: set[int]) -> tuple[list[int], str]:
  """The sampled ids up to the token that completes the first `</query>` (EOS dropped), and their text."""
  kept = [i for i in ids if i not in eos_ids]

  def decode(x: Sequence[int]) -> str:
    return tokenizer.decode(list(x), skip_special_tokens=True)

  n = stop_prefix_length(kept, decode, ("</query>",))
  kept = kept if n is None else kept[:n]
  return kept, decode(kept)


def run_episodes(policy: Policy, tokenizer: Any, retriever: Any, examples: Sequence[QAExample],
                 initial_docs: Sequence[Sequence[Doc]], config: EpisodeConfig,
                 watch: Stopwatch | None = None) -> list[Episode]:
  """Runs one episode per example to the end. `initial_docs[i]` is example i's naive-RAG block (empty
  list: no initial block, "w/o begin with search"). `watch`, when given, accumulates the seconds spent in
  `sample` and `retrieve`; the rest of the call is host-side work."""
  watch = watch if watch is not None else Stopwatch()
  from s3_jax.models.tokenizer import chat_prompt_ids

  if config.turn_semantics not in TURN_SEMANTICS:
    raise ValueError(f"rollout.turn_semantics={config.turn_semantics!r} must be "
                     f"{' or '.join(TURN_SEMANTICS)}")
  eos_ids = {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
  episodes = [Episode(ex, chat_prompt_ids(tokenizer, protocol.build_prompt(ex.question, docs, config.bm25)),
                      [list(docs)]) for ex, docs in zip(examples, initial_docs, strict=True)]
  search_rounds = config.max_turns + 1 if config.turn_semantics == "s3" else config.max_turns
  rollout = object()  # keys of this rollout's episodes: (rollout, index)
  try:
    _turns(policy, tokenizer, retriever, episodes, config, search_rounds, rollout, eos_ids, watch)
  finally:
    release = getattr(policy, "release", None)
    if release is not None:
      release()
  for e in episodes:
    if not e.done:
      e.ended = "cap" if len(e.prompt_ids) + len(e.ids) >= config.max_prompt_length else "turns"
  return episodes


def _turns(policy, tokenizer, retriever, episodes, config, search_rounds, rollout, eos_ids, watch) -> None:
  number = {id(e): i for i, e in enumerate(episodes)}
  for turn in range(search_rounds + 1):  # the last round is the final, no-search turn
    final = turn == search_rounds
    active = [e for e in episodes if not e.done]
    if not active:
      break
    room = [config.max_prompt_length - len(e.prompt_ids) - len(e.ids) for e in active]
    for e, r in zip(active, room, strict=True):
      if r <= 0:
        e.ended = "cap"
    active = [e for e, r in zip(active, room, strict=True) if r > 0]
    if not active:
      break
    with watch("sample"):
      sampled = policy.sample([e.prompt_ids + e.ids for e in active],
                              [min(config.max_response_length, r) for r in room if r > 0],
                              keys=[(rollout, number[id(e)]) for e in active])
    searching: list[tuple[Episode, str]] = []
    for e, ids in zip(active, sampled, strict=True):
      ids, text = _cut_ids(tokenizer, ids, eos_ids)
      e.append(ids, from_policy=True)
      text = protocol.cut_response(text)
      e.responses.append(text)
      e.response_blocks.append(len(e.blocks) - 1)
      action = protocol.parse_action(text)
      if action.kind == "complete":
        e.ended = "complete"
      elif final:
        e.ended = "turns"
      elif action.kind == "search":
        searching.append((e, action.query))
      else:
        e.invalid_actions += 1
        e.append(tokenizer(protocol.NUDGE, add_special_tokens=False)["input_ids"], from_policy=False)
    if searching:
      with watch("retrieve"):
        results = retriever.search([q for _, q in searching], config.topk)
      for (e, query), docs in zip(searching, results, strict=True):
        e.queries.append(query)
        e.blocks.append(list(docs))
        obs = tokenizer(protocol.observation_text(observation(docs)), add_special_tokens=False)["input_ids"]
        e.append(obs[:config.max_obs_length], from_policy=False)
