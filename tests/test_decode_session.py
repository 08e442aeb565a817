"""`DecodeSession` (the KV cache kept across turns) and the sampler's row compaction, against the
re-prefill path (`Sampler.generate` on the whole context) and against `transformers`."""

import jax
import numpy as np
import pytest
import torch
from test_decoder import make_hf_model

from s3_jax import tracing
from s3_jax.models import sampler as sampler_lib
from s3_jax.models.hf import load_hf
from s3_jax.models.sampler import Sampler, SamplingParams


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_session")
  reference = make_hf_model("LlamaForCausalLM", folder, num_hidden_layers=3, max_position_embeddings=1024)
  return reference, load_hf(folder)


def _hf_greedy(reference, prompt, steps, eos):
  ids = list(prompt)
  for _ in range(steps):
    with torch.no_grad():
      token = int(torch.argmax(reference(torch.tensor([ids])).logits[0, -1]))
    ids.append(token)
    if token in eos:
      break
  return ids[len(prompt):]


def _assert_same_as_re_prefill_and_transformers(sampler, reference, contexts, cached, steps):
  """`cached` (a session's output) equals the re-prefill path on `contexts` and transformers' greedy ids."""
  fresh = sampler.generate(contexts, SamplingParams(max_new_tokens=steps))
  assert cached.tokens == fresh.tokens
  for got, want in zip(cached.logprobs, fresh.logprobs, strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  eos = set(sampler.eos_token_ids.tolist())
  for context, ids in zip(contexts, cached.tokens, strict=True):
    assert ids == _hf_greedy(reference, context, steps, eos)


def _turns(sampler, rng, turns=3, n=5, steps=10):
  """Multi-turn conversations as a rollout runs them: each turn continues every live context, keeps the
  sampled ids (the last one cut from some, as a stop-string cut does), and appends an 'observation' of a
  different length per row; conversation 1 ends after turn 1 and a new one (key 9) starts at turn 2.
  Yields (keys, contexts, limits) of every turn together with the session's and the re-prefill outputs."""
  session = sampler.session()
  keys = list(range(n))
  contexts = {k: rng.integers(1, 128, int(rng.integers(3, 30))).tolist() for k in keys}
  for turn in range(turns):
    live = list(keys)
    limits = [int(rng.integers(1, steps)) for _ in live]
    batch = [contexts[k] for k in live]
    cached = session.generate(live, batch, SamplingParams(max_new_tokens=steps), max_new_tokens=limits)
    fresh = sampler.generate(batch, SamplingParams(max_new_tokens=steps), max_new_tokens=limits)
    yield live, batch, limits, cached, fresh
    for k, ids in zip(live, cached.tokens, strict=True):
      kept = ids[:-1] if (k + turn) % 2 and len(ids) > 1 else ids
      contexts[k] = contexts[k] + kept + rng.integers(1, 128, int(rng.integers(1, 40))).tolist()
    if turn == 0:
      keys.remove(1)
      keys.append(9)
      contexts[9] = rng.integers(1, 128, 12).tolist()


def test_session_equals_re_prefill_and_transformers_over_turns(tiny):
  reference, model = tiny
  sampler = Sampler(model, eos_token_ids=[7, 19], chunk=4)  # rows end at different steps: compaction
  eos = set(sampler.eos_token_ids.tolist())  # 7, 19 and the config's EOS
  for _live, batch, limits, cached, fresh in _turns(sampler, np.random.default_rng(0)):
    assert cached.tokens == fresh.tokens
    assert cached.finish_reasons == fresh.finish_reasons
    for got, want in zip(cached.logprobs, fresh.logprobs, strict=True):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    for context, limit, ids in zip(batch, limits, cached.tokens, strict=True):
      assert ids == _hf_greedy(reference, context, limit, eos)
  # later turns prefilled into the kept cache (all rows at once, or in length groups)
  assert sampler.trace_counts["extend"] >= 1 and sampler.trace_counts["repack"] >= 1


def test_rows_of_very_different_new_lengths_extend_in_groups_with_the_same_result(tiny):
  """A turn where one conversation appends a long observation and the rest a short nudge is extended in two
  length groups (each written into its rows of the decode-layout cache): the same tokens as the re-prefill
  path and transformers."""
  reference, model = tiny
  sampler = Sampler(model, eos_token_ids=[7], chunk=4)
  session = sampler.session()
  rng = np.random.default_rng(3)
  keys = list(range(6))
  contexts = [rng.integers(1, 128, int(rng.integers(5, 25))).tolist() for _ in keys]
  first = session.generate(keys, contexts, SamplingParams(max_new_tokens=5))
  contexts = [c + ids + rng.integers(1, 128, 150 if k == 2 else 2).tolist()
              for k, c, ids in zip(keys, contexts, first.tokens, strict=True)]
  calls = []
  write_rows = sampler._write_rows
  sampler._write_rows = lambda *a, **kw: calls.append(a[2].slots - kw["start"]) or write_rows(*a, **kw)
  cached = session.generate(keys, contexts, SamplingParams(max_new_tokens=6))
  assert sorted(calls) == [16, 160]  # two groups, each extended and written into its rows
  _assert_same_as_re_prefill_and_transformers(sampler, reference, contexts, cached, 6)
  # and the next turn continues from that cache
  contexts = [c + ids + [5] for c, ids in zip(contexts, cached.tokens, strict=True)]
  assert session.generate(keys, contexts, SamplingParams(max_new_tokens=4)).tokens == \
      sampler.generate(contexts, SamplingParams(max_new_tokens=4)).tokens


def _group_work(lengths, groups, minimum, prefix_slots):
  """The padded work of extending `groups` (lists of rows), as `_length_groups` documents it, plus its
  charge for every group after the first (counted here, not taken from the sampler)."""
  def one(rows):
    chunk = tracing.bucket_length(max(lengths[i] for i in rows), minimum)
    batch = 1 << (len(rows) - 1).bit_length()
    return batch * chunk * (sampler_lib.EXTEND_TOKEN_SLOTS + prefix_slots + chunk)
  return sum(one(rows) for rows in groups), one(range(len(lengths)))


def _all_partitions(n, most):
  """Every split of rows 0 ... n-1 into at most `most` non-empty groups (contiguous or not)."""
  def grow(i, groups):
    if i == n:
      yield [list(g) for g in groups]
      return
    for g in groups:
      g.append(i)
      yield from grow(i + 1, groups)
      g.pop()
    if len(groups) < most:
      groups.append([i])
      yield from grow(i + 1, groups)
      groups.pop()
  yield from grow(0, [])


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_are_the_least_work_of_every_split(seed):
  """`_length_groups` against every way to split 7 rows into at most 4 groups (not only neighbouring
  lengths): its split's work, with the charge per extra group, is the least there is."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 700, 7).tolist() if seed % 2 else rng.choice([3, 30, 300, 650], 7).tolist()
  prefix = [0, 640, 1280][seed % 3]
  groups = sampler_lib._length_groups(lengths, 16, prefix)
  assert sorted(i for g in groups for i in g) == list(range(7))
  def charged(split):
    work, whole = _group_work(lengths, split, 16, prefix)
    return work + (len(split) - 1) * sampler_lib.EXTEND_GROUP_SAVING * whole
  least = min(charged(split) for split in _all_partitions(7, 4))
  assert charged(groups) == pytest.approx(least)


def test_length_groups_of_similar_rows_stay_one_and_a_first_turn_splits():
  assert sampler_lib._length_groups([100, 101, 99, 100], 16, 640) == [[0, 1, 2, 3]]
  assert sampler_lib._length_groups([700], 16, 640) == [[0]]
  assert sampler_lib._length_groups([3, 700], 16, 0) == [[0], [1]]  # 2 rows: at most 2 groups
  # a rollout's first turn (SmolLM2, 16 FanOutQA questions with their 3 documents, after the 640-token
  # shared template; benchmarks/rollout.py): two groups saved 17% of the padded tokens, these save more
  first_turn = [469, 484, 434, 424, 470, 467, 665, 510, 291, 613, 479, 438, 427, 576, 557, 527]
  groups = sampler_lib._length_groups(first_turn, 16, 640)
  assert len(groups) >= 3
  tokens = sum((1 << (len(g) - 1).bit_length()) * tracing.bucket_length(max(first_turn[i] for i in g), 16)
               for g in groups)
  assert tokens < 0.8 * 16 * 768


def test_a_first_turn_of_many_lengths_extends_in_several_groups_with_the_same_result(tiny):
  """New conversations with a common template and new parts of very different lengths (s3's first turn:
  a question and its documents after the instruction) are extended in three or more groups, each over a
  cache of only its rows' kept slots and its own chunk, written back into the decode-layout cache: the same
  tokens and log-probs as the re-prefill path and transformers, this turn and the next."""
  reference, model = tiny
  sampler = Sampler(model, eos_token_ids=[7], chunk=4)
  calls = []
  extend = sampler._extend
  sampler._extend = lambda *args: calls.append(args[2].shape) or extend(*args)
  session = sampler.session()
  rng = np.random.default_rng(5)
  template = rng.integers(1, 128, 64).tolist()
  news = [10, 260, 12, 130, 60, 250, 70, 140]
  contexts = [template + rng.integers(1, 128, n).tolist() for n in news]
  cached = session.generate(list(range(8)), contexts, SamplingParams(max_new_tokens=6))
  assert len(calls) >= 3
  assert sum(b * t for b, t in calls) < 8 * tracing.bucket_length(max(news), 16)
  _assert_same_as_re_prefill_and_transformers(sampler, reference, contexts, cached, 6)
  # the next turn continues from that cache (its slots past each row's kept prefix are empty) and
  # appends 1, 41 or 81 tokens: groups again
  contexts = [c + ids + [5] * (1 + 40 * (k % 3)) for k, (c, ids) in enumerate(zip(contexts, cached.tokens,
                                                                                 strict=True))]
  calls.clear()
  cached = session.generate(list(range(8)), contexts, SamplingParams(max_new_tokens=4))
  assert len(calls) >= 2
  _assert_same_as_re_prefill_and_transformers(sampler, reference, contexts, cached, 4)


def test_session_reuses_the_cache_and_forgets_ended_conversations(tiny):
  _, model = tiny
  sampler = Sampler(model, chunk=4)
  session = sampler.session()
  first = session.generate(["a", "b"], [[1, 2, 3, 4], [5, 6]], SamplingParams(max_new_tokens=6))
  assert session.reused_tokens == 0 and session.prefilled_tokens == 6
  context = [1, 2, 3, 4] + first.tokens[0] + [9, 9]
  session.generate(["a"], [context], SamplingParams(max_new_tokens=3))
  assert session.reused_tokens == 4 + 6  # the prompt and the sampled turn came from the cache
  assert session.prefilled_tokens == 6 + 2
  assert set(session._cached) == {"a"}  # "b" was not continued: its cache is gone
  sampler.set_params(jax.tree.map(lambda x: x * 1.0, sampler.params))  # new weights: nothing is reused
  session.generate(["a"], [context], SamplingParams(max_new_tokens=3))
  assert session.reused_tokens == 10


def test_compaction_gives_the_same_answers_as_one_row_at_a_time(tiny):
  _, model = tiny
  prompts = [np.random.default_rng(i).integers(1, 128, 5 + 3 * i).tolist() for i in range(7)]
  params = SamplingParams(max_new_tokens=24)
  # 107, 44, 33 are greedy tokens of rows 1, 2, 3 (at steps 7, 4, 2) of this seeded model: with them as EOS,
  # four rows end early and three run to the limit, so the batch of 8 compacts to 4
  sampler = Sampler(model, eos_token_ids=[107, 44, 33], chunk=2)
  together = sampler.generate(prompts, params)
  alone = [sampler.generate([p], params) for p in prompts]
  assert together.tokens == [a.tokens[0] for a in alone]
  assert together.finish_reasons == [a.finish_reasons[0] for a in alone]
  assert len({len(t) for t in together.tokens}) > 2  # rows really ended at different steps
  assert sampler.trace_counts["take"] >= 1  # and the batch was compacted


def test_session_bad_requests(tiny):
  _, model = tiny
  session = Sampler(model).session()
  with pytest.raises(ValueError, match="one distinct key per context"):
    session.generate([1, 1], [[1], [2]])
  with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=1024"):
    session.generate([1], [[1] * 1000], SamplingParams(max_new_tokens=100))


def test_new_conversations_with_a_common_start_prefill_it_once(tiny):
  """Five new conversations that begin with the same 70 tokens (an instruction template): 64 of them are
  prefilled once at batch 1 and every row continues from that cache. Same tokens and log-probs as the
  re-prefill path and transformers, this turn and the next; without a common start nothing is shared."""
  reference, model = tiny
  sampler = Sampler(model, eos_token_ids=[7], chunk=4)
  session = sampler.session()
  rng = np.random.default_rng(11)
  template = rng.integers(1, 128, 70).tolist()
  keys = list(range(5))
  contexts = [template + rng.integers(1, 128, int(rng.integers(2, 30))).tolist() for _ in keys]
  cached = session.generate(keys, contexts, SamplingParams(max_new_tokens=6))
  assert session.shared_prefix_tokens == 64
  assert session.prefilled_tokens == 64 + sum(len(c) - 64 for c in contexts)
  _assert_same_as_re_prefill_and_transformers(sampler, reference, contexts, cached, 6)
  contexts = [c + ids + [5, 6] for c, ids in zip(contexts, cached.tokens, strict=True)]
  assert session.generate(keys, contexts, SamplingParams(max_new_tokens=4)).tokens == \
      sampler.generate(contexts, SamplingParams(max_new_tokens=4)).tokens
  other = sampler.session()
  other.generate([0, 1], [[*template[:40], 3], [*template[:40], 4]], SamplingParams(max_new_tokens=2))
  assert other.shared_prefix_tokens == 0  # 40 common tokens: under SHARED_PREFIX_MULTIPLE


def test_released_weights_refuse_to_sample_until_set_again(tiny):
  """`release_params` (the trainer frees the sampler's copy between rollouts) drops the copy; sampling then
  fails with a clear error, and `set_params` restores the same output as before."""
  _, model = tiny
  sampler = Sampler(model, chunk=4)
  prompt = [[3, 1, 4, 1, 5]]
  before = sampler.generate(prompt, SamplingParams(max_new_tokens=5)).tokens
  sampler.release_params()
  assert sampler.params is None
  with pytest.raises(RuntimeError, match="released"):
    sampler.generate(prompt, SamplingParams(max_new_tokens=5))
  with pytest.raises(RuntimeError, match="released"):
    sampler.session().generate([0], prompt, SamplingParams(max_new_tokens=5))
  sampler.set_params(model.arrays())
  assert sampler.generate(prompt, SamplingParams(max_new_tokens=5)).tokens == before
