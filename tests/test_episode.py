"""Whole episodes with a scripted policy (it emits given strings) against a real BM25 retriever over gRPC:
the exact observations, D_s3 and masks."""

import numpy as np
import pytest

from s3_jax.data.qa import QAExample
from s3_jax.retrieval import build_index, load_retriever
from s3_jax.search import protocol
from s3_jax.search.episode import EpisodeConfig, run_episodes
from s3_jax.search.formats import observation
from s3_jax.services import RetrieverClient
from s3_jax.services.retriever_server import RetrieverService, start_server


class ScriptedPolicy:
  """Emits, for each context, the next scripted turn of the episode whose prompt the context starts with."""

  def __init__(self, tokenizer, scripts):
    self.tokenizer, self.scripts, self.calls = tokenizer, scripts, []

  def sample(self, contexts, max_new_tokens, keys=None):
    self.calls.append(len(contexts))
    out = []
    for context in contexts:
      key = next(k for k in self.scripts if context[:len(k)] == list(k))
      text = self.scripts[key].pop(0)
      out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id])
    return out


@pytest.fixture(scope="module")
def tokenizer(asset):
  from s3_jax.models.tokenizer import load_tokenizer

  return load_tokenizer(asset("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def retriever(asset, tmp_path_factory):
  out = tmp_path_factory.mktemp("bm25")
  build_index(asset("wiki-vital") / "corpus.jsonl", out, "bm25")
  local = load_retriever(out)
  server, port = start_server(RetrieverService(local, "bm25", len(local.store)))
  yield RetrieverClient(f"127.0.0.1:{port}", local_index=None), local
  server.stop(grace=0).wait()


def test_scripted_episodes_over_grpc(tokenizer, retriever):
  client, local = retriever
  from s3_jax.models.tokenizer import chat_prompt_ids

  examples = [QAExample("a", "Who composed the opera Carmen?", ("Georges Bizet",), "test"),
              QAExample("b", "What is the capital of France?", ("Paris",), "test")]
  initial = local.search([ex.question for ex in examples], 3)
  config = EpisodeConfig(topk=3, max_select=2, max_turns=1, max_obs_length=10_000, bm25=True)
  prompts = [tuple(chat_prompt_ids(tokenizer, protocol.build_prompt(ex.question, docs, bm25=True)))
             for ex, docs in zip(examples, initial, strict=True)]
  scripts = {
      prompts[0]: ['<query>\n{"query": "Bizet opera Carmen"}\n</query> trailing text is cut',
                   "<important_info>[2]</important_info>\n<search_complete>True</search_complete>"],
      prompts[1]: ["I am not sure.",  # invalid: the nudge follows
                   '{"query": "capital of France"}\n</query>',  # continues the nudge's open <query>
                   "<important_info>[1, 3]</important_info><search_complete>False</search_complete>"
                   '<query>{"query": "Paris"}</query>'],  # the final turn: no more searching
  }
  policy = ScriptedPolicy(tokenizer, scripts)
  episodes = run_episodes(policy, tokenizer, client, examples, initial, config)
  first, second = episodes
  assert policy.calls == [2, 2, 1]  # finished episodes leave the batch

  searched = local.search(["Bizet opera Carmen"], 3)[0]
  assert first.queries == ["Bizet opera Carmen"] and first.ended == "complete"
  assert first.blocks == [initial[0], searched]
  policy_text = tokenizer.decode([t for t, p in zip(first.ids, first.policy_mask, strict=True) if p])
  env_text = tokenizer.decode([t for t, p in zip(first.ids, first.policy_mask, strict=True) if not p])
  assert policy_text == ('<query>\n{"query": "Bizet opera Carmen"}\n</query>'
                         "<important_info>[2]</important_info>\n<search_complete>True</search_complete>")
  assert env_text == protocol.observation_text(observation(searched))
  assert [d.text for d in first.selected_docs(2)] == [searched[1].text] + \
      [d.text for d in initial[0] if d.text != searched[1].text]

  assert second.invalid_actions == 1 and second.queries == ["capital of France"]
  assert second.ended == "turns" and len(second.responses) == 3
  env_text = tokenizer.decode([t for t, p in zip(second.ids, second.policy_mask, strict=True) if not p])
  paris = local.search(["capital of France"], 3)[0]
  assert env_text == protocol.NUDGE + protocol.observation_text(observation(paris))
  assert second.responses[1].startswith("<query>\n")  # restored before parsing, as s3 does
  stats = second.stats()
  assert stats["turns"] == 3 and stats["searches"] == 1 and stats["invalid_actions"] == 1
  assert stats["docs_selected"] == 2 and first.stats()["docs_selected"] == 1
  # D_s3: the selection [1, 3] from the searched block (cap 2), then the unselected initial block.
  assert [d.text for d in second.selected_docs(2)][:2] == [paris[0].text, paris[2].text]


def test_rollout_batch_masks(tokenizer, retriever):
  from s3_jax.rl.batch import make_batch

  client, local = retriever
  examples = [QAExample("a", "Who composed the opera Carmen?", ("Georges Bizet",), "test"),
              QAExample("b", "What is the capital of France?", ("Paris",), "test")]
  initial = local.search([ex.question for ex in examples], 2)

  class Fixed:
    def __init__(self):
      self.turn = 0

    def sample(self, contexts, max_new_tokens, keys=None):
      self.turn += 1
      text = ('<query>{"query": "Bizet"}</query>' if self.turn == 1
              else "<search_complete>True</search_complete>")
      return [tokenizer(text, add_special_tokens=False)["input_ids"] for _ in contexts]

  episodes = run_episodes(Fixed(), tokenizer, client, examples, initial, EpisodeConfig(topk=2, max_turns=1))
  batch = make_batch(episodes, [2.0, -1.0], pad_id=tokenizer.pad_token_id or 0, length_multiple=64)
  assert batch.shape[1] % 64 == 0
  masks = [batch.prompt_mask, batch.policy_mask, batch.obs_mask]
  assert not any((a & b).any() for i, a in enumerate(masks) for b in masks[i + 1:])  # disjoint
  assert ((batch.prompt_mask | batch.policy_mask | batch.obs_mask) == batch.attention_mask).all()
  for row, episode in enumerate(episodes):
    p = len(episode.prompt_ids)
    assert batch.prompt_mask[row].sum() == p and batch.tokens[row, :p].tolist() == episode.prompt_ids
    policy_text = tokenizer.decode(batch.tokens[row][batch.policy_mask[row]])
    assert policy_text == '<query>{"query": "Bizet"}</query><search_complete>True</search_complete>'
    obs_text = tokenizer.decode(batch.tokens[row][batch.obs_mask[row]])
    assert obs_text == protocol.observation_text(observation(episode.blocks[1]))
    last_policy = int(np.flatnonzero(batch.policy_mask[row])[-1])
    assert batch.rewards[row, last_policy] == [2.0, -1.0][row] and np.count_nonzero(batch.rewards[row]) == 1
  with pytest.raises(ValueError, match="1 rewards for 2 episodes"):
    make_batch(episodes, [1.0], pad_id=0)


def test_ablation_switches(tokenizer, retriever):
  from s3_jax.search.episode import initial_blocks

  client, local = retriever
  retrieved = local.search(["Who composed the opera Carmen?"], 12)
  assert [len(b) for b in initial_blocks(retrieved, True, 3)] == [3]
  assert [len(b) for b in initial_blocks(retrieved, True, 12)] == [12]
  assert initial_blocks(retrieved, False, 3) == [[]]
  example = QAExample("a", "Who composed the opera Carmen?", ("Georges Bizet",), "test")
  script = ['<query>{"query": "Bizet"}</query>', "<important_info>[1]</important_info>"
            "<search_complete>True</search_complete>"]

  class Scripted:
    def sample(self, contexts, max_new_tokens, keys=None):
      return [tokenizer(script.pop(0), add_special_tokens=False)["input_ids"]]

  [episode] = run_episodes(Scripted(), tokenizer, client, [example], initial_blocks(retrieved, True, 2),
                           EpisodeConfig(topk=3, max_turns=1))
  searched = episode.blocks[1]
  assert [d.text for d in episode.selected_docs(3)] == [searched[0].text] + [d.text for d in retrieved[0][:2]
                                                                            if d.text != searched[0].text]
  everything = [d.text for d in episode.selected_docs(3, selection=False)]  # "w/o selection"
  assert everything == list(dict.fromkeys([d.text for d in retrieved[0][:2]] + [d.text for d in searched]))
  faithful = episode.generator_docs("faithful", 3, tokenizer=tokenizer)  # s3's parser on the decoded text
  assert [d.text for d in faithful] == [d.text for d in episode.generator_docs("safe", 3)]
  with pytest.raises(ValueError, match="doc_extraction='both' must be safe or faithful"):
    episode.generator_docs("both", 3)


@pytest.mark.slow
@pytest.mark.late(seconds=70)
def test_real_policy_batch_of_4(asset, tokenizer, retriever):
  import jax.numpy as jnp

  from s3_jax.data.qa import read_qa
  from s3_jax.models.hf import load_hf
  from s3_jax.models.sampler import Sampler
  from s3_jax.rl.batch import make_batch
  from s3_jax.search.episode import SamplerPolicy

  client, local = retriever
  examples = read_qa(asset("qa-fanout") / "train.jsonl")[:4]
  model = load_hf(asset("smollm2-135m-instruct"), dtype=jnp.float32)
  policy = SamplerPolicy(Sampler(model, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0),
                         temperature=0.6, top_p=0.95, seed=0)
  config = EpisodeConfig(topk=3, max_turns=1, turn_semantics="exact", max_response_length=48,
                         max_obs_length=256, max_prompt_length=4096, bm25=True)
  initial = local.search([e.question for e in examples], 3)
  episodes = run_episodes(policy, tokenizer, client, examples, initial, config)
  assert len(episodes) == 4 and all(e.ended in ("complete", "turns", "cap") for e in episodes)
  for e in episodes:
    stats = e.stats()
    assert 1 <= stats["turns"] <= config.max_turns + 1  # exact: max_turns search rounds + a final turn
    assert stats["searches"] == len(e.blocks) - 1 == len(e.queries) <= config.max_turns
    assert stats["turns"] >= stats["searches"] + stats["invalid_actions"]
    assert len(e.policy_mask) == len(e.ids) and stats["policy_tokens"] > 0
    assert len(e.prompt_ids) < stats["context_tokens"] <= config.max_prompt_length
    assert stats["docs_selected"] <= sum(len(b) for b in e.blocks)
    assert e.selected_docs(3)  # D_s3 always holds at least the initial block
  batch = make_batch(episodes, [1.0] * 4, pad_id=tokenizer.pad_token_id or 0)
  assert not (batch.policy_mask & (batch.prompt_mask | batch.obs_mask)).any()
  # Every policy position holds what the policy sampled: decoding it gives the turns' texts back.
  for row, e in enumerate(episodes):
    policy_text = tokenizer.decode(batch.tokens[row][batch.policy_mask[row]])
    assert policy_text.replace("<query>\n", "") == "".join(e.responses).replace("<query>\n", "")


def _greedy_rollouts(model, tokenizer, client, examples, initial, config):
  """The same greedy episodes with each episode's KV cache kept across turns and with the whole context
  re-prefilled every turn."""
  from s3_jax.models.sampler import Sampler
  from s3_jax.search.episode import SamplerPolicy

  out = {}
  for keep in (True, False):
    sampler = Sampler(model, tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id or 0, chunk=8)
    policy = SamplerPolicy(sampler, temperature=0.0, top_p=1.0, keep_cache=keep)
    out[keep] = run_episodes(policy, tokenizer, client, examples, initial, config)
    if keep:
      # later turns did prefill into the kept cache (all rows at once, or in length groups)
      assert sampler.trace_counts["extend"] >= 1
  return out[True], out[False]


@pytest.mark.parametrize("model_name", ["tiny", pytest.param("smollm2", marks=[pytest.mark.slow,
                                                                              pytest.mark.late(seconds=180)])])
def test_cached_turns_give_the_re_prefill_trajectories(model_name, asset, tokenizer, retriever, tmp_path):
  import jax.numpy as jnp
  from test_decoder import make_hf_model

  from s3_jax.data.qa import read_qa
  from s3_jax.models.hf import load_hf

  client, local = retriever
  examples = read_qa(asset("qa-fanout") / "train.jsonl")[:8 if model_name == "tiny" else 4]
  initial = local.search([e.question for e in examples], 3)
  if model_name == "tiny":  # random text: every turn is invalid and gets the nudge; prompts differ in length,
    make_hf_model("LlamaForCausalLM", tmp_path, vocab_size=len(tokenizer), max_position_embeddings=4096)
    model = load_hf(tmp_path)  # so a context cap makes episodes end at different turns
    cap = 80 + len(tokenizer(protocol.build_prompt(examples[0].question, initial[0], True))["input_ids"])
    config = EpisodeConfig(topk=3, max_turns=4, turn_semantics="exact", max_response_length=24,
                           max_obs_length=256, max_prompt_length=cap, bm25=True)
  else:  # without the initial block greedy SmolLM2 searches (with it, it completes at once)
    initial = [[] for _ in examples]
    model = load_hf(asset("smollm2-135m-instruct"), dtype=jnp.float32)
    config = EpisodeConfig(topk=3, max_turns=2, turn_semantics="exact", max_response_length=64,
                           max_obs_length=256, max_prompt_length=4096, bm25=True)
  cached, fresh = _greedy_rollouts(model, tokenizer, client, examples, initial, config)
  for a, b in zip(cached, fresh, strict=True):
    assert a.ids == b.ids and a.policy_mask == b.policy_mask
    assert a.responses == b.responses and a.queries == b.queries and a.ended == b.ended
  if model_name == "tiny":
    assert len({len(e.responses) for e in cached}) > 1  # episodes ended at different turns
  else:  # SmolLM2's turns end at different steps (compaction); its episodes search
    assert sum(len(e.queries) for e in cached) >= 2


@pytest.mark.parametrize("text, stops", [("ab</query>cd</query>", ("</query>",)),
                                         ("x</answer>y</q>", ("</q>", "</answer>")),
                                         ("no stop here", ("</query>",)), ("", ("</query>",))])
def test_stop_prefix_length_is_where_the_first_stop_string_ends(text, stops):
  """One id per character, so the shortest prefix holding a stop string ends where `str.find` says the first
  one ends (None: no stop string in the text)."""
  from s3_jax.models.tokenizer import stop_prefix_length

  def decode(ids):
    return "".join(map(chr, ids))

  ends = [text.find(s) + len(s) for s in stops if s in text]
  assert stop_prefix_length([ord(c) for c in text], decode, stops) == (min(ends) if ends else None)
