"""The KV-cache sampler against step-by-step `transformers` references and NumPy distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_decoder import make_hf_model

from s3_jax import sharding
from s3_jax.models.hf import load_hf
from s3_jax.models.sampler import Sampler, SamplingParams, draw_token, first_max, sample_logits, top_p_floor

PROMPTS = [[5, 9, 17, 3, 44, 2, 7], [11, 12], [100, *range(1, 18)]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny")
  reference = make_hf_model("LlamaForCausalLM", folder, num_hidden_layers=3)
  return reference, load_hf(folder)


def _hf_greedy(reference, prompt, steps):
  """Reference: argmax of a full forward pass per step; also the log-softmax of each chosen token."""
  ids, logprobs = list(prompt), []
  for _ in range(steps):
    with torch.no_grad():
      logits = reference(torch.tensor([ids])).logits[0, -1].double()
    token = int(torch.argmax(logits))
    logprobs.append(float(torch.log_softmax(logits, -1)[token]))
    ids.append(token)
  return ids[len(prompt):], logprobs


def test_greedy_batch_of_mixed_lengths_matches_transformers(tiny):
  reference, model = tiny
  out = Sampler(model).generate(PROMPTS, SamplingParams(max_new_tokens=12))
  for prompt, tokens, logprobs, reason in zip(PROMPTS, out.tokens, out.logprobs, out.finish_reasons,
                                              strict=True):
    expected, expected_logprobs = _hf_greedy(reference, prompt, 12)
    assert tokens == expected
    np.testing.assert_allclose(logprobs, expected_logprobs, rtol=0, atol=1e-4)
    assert reason == "length"


def test_per_row_limits_and_eos(tiny):
  reference, model = tiny
  expected, _ = _hf_greedy(reference, PROMPTS[0], 10)
  eos = expected[4]  # the 5th greedy token of row 0 becomes "EOS"
  sampler = Sampler(model, eos_token_ids=[eos])
  out = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=10), max_new_tokens=[10, 3, 0])
  first = expected.index(eos) + 1
  assert out.tokens[0] == expected[:first] and out.finish_reasons[0] == "eos"
  assert len(out.tokens[1]) == 3 or out.finish_reasons[1] == "eos"
  assert out.tokens[2] == [] and out.finish_reasons[2] == "length"


def test_same_bucket_does_not_retrace(tiny):
  _, model = tiny
  sampler = Sampler(model)
  sampler.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5))
  counts = dict(sampler.trace_counts)
  sampler.generate([[4, 5, 6, 7, 8, 9]], SamplingParams(max_new_tokens=9))  # same buckets (16, 16)
  sampler.generate([[4, 5], [6]], SamplingParams(max_new_tokens=4))  # batch 2: a new bucket
  # no session: no cache kept across calls
  none = {"extend": 0, "take": 0, "repack": 0, "gather_rows": 0, "write_rows": 0}
  assert counts == {"prefill": 1, "decode": 1, **none}
  assert sampler.trace_counts == {"prefill": 2, "decode": 2, **none}
  sampler.generate([[9], [8, 7]], SamplingParams(max_new_tokens=16))
  assert sampler.trace_counts == {"prefill": 2, "decode": 2, **none}


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6),
                                                       (0.8, 4, 0.7)])
def test_sampling_distribution_matches_numpy(temperature, top_k, top_p):
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
  scaled = logits / temperature
  keep = np.ones_like(logits, bool)
  if top_k:
    keep &= scaled >= np.sort(scaled)[::-1][top_k - 1]
  order = np.argsort(-scaled)
  probs = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
  before = np.cumsum(probs[order]) - probs[order]
  keep_p = np.zeros_like(keep)
  keep_p[order[before < top_p]] = True
  keep &= keep_p
  expected = np.where(keep, np.exp(scaled), 0)
  expected /= expected.sum()
  n = 40_000
  draws = sample_logits(jnp.tile(jnp.asarray(logits), (n, 1)), jax.random.key(1), jnp.float32(temperature),
                        jnp.float32(top_p), greedy=False, top_k=top_k, use_top_p=top_p < 1)
  freq = np.bincount(np.asarray(draws), minlength=len(logits)) / n
  assert np.all(freq[~keep] == 0)
  np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(0.25 / n))  # 4 sigma of a binomial


def _sorted_top_p_keep(scaled: np.ndarray, top_p: float) -> np.ndarray:
  """Reference nucleus of one row, by sorting: keep tokens while the mass before them is below top_p, then
  every token at least as likely as the least likely kept one."""
  order = np.argsort(-scaled, kind="stable")
  probs = np.exp(scaled.astype(np.float64) - scaled.max())
  probs /= probs.sum()
  before = np.cumsum(probs[order]) - probs[order]
  return scaled >= scaled[order][before < top_p].min()


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.95, 0.999])
def test_top_p_floor_keeps_the_sorted_nucleus(top_p):
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(64, 3000)).astype(np.float32) * rng.uniform(0.5, 8, size=(64, 1)).astype(np.float32)
  rows[:16] = np.round(rows[:16], 1)  # many ties
  rows[16:32, ::3] = -np.inf  # what a top-k cut leaves
  rows[32] = 0.0  # one value only: everything is kept
  rows[33, :] = -1.0
  rows[33, 7] = -0.0  # a negative zero among negatives
  floor = np.asarray(top_p_floor(jnp.asarray(rows), jnp.float32(top_p)))
  keys = rows.view(np.int32)
  keys = np.where(keys < 0, keys ^ np.int32(0x7FFFFFFF), keys)
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(keys[i] >= floor[i], _sorted_top_p_keep(row, top_p), err_msg=f"row {i}")


def test_first_max_is_numpy_argmax():
  rng = np.random.default_rng(1)
  rows = np.round(rng.normal(size=(32, 5000)), 1).astype(np.float32)  # ties at the maximum
  rows[3] = -np.inf
  rows[4, 100:] = rows[4].max() + 1  # many tied maxima: the first wins
  np.testing.assert_array_equal(np.asarray(first_max(jnp.asarray(rows))), np.argmax(rows, axis=-1))


def test_draw_token_follows_the_weights_across_blocks():
  weights = np.zeros(300, np.float64)  # 3 blocks of 128, the last one partial
  weights[[0, 5, 127, 128, 250, 299]] = [0.1, 0.25, 0.05, 0.2, 0.3, 0.1]  # block 1's tokens 129-249 are 0
  scaled = np.where(weights > 0, np.log(np.where(weights > 0, weights, 1)), -np.inf).astype(np.float32)
  n = 40_000
  draws = np.asarray(draw_token(jnp.tile(jnp.asarray(scaled), (n, 1)), jax.random.key(3)))
  freq = np.bincount(draws, minlength=300) / n
  assert np.all(freq[weights == 0] == 0)
  np.testing.assert_allclose(freq, weights, atol=4 * np.sqrt(0.25 / n))  # 4 sigma of a binomial


def test_top_k_one_is_greedy(tiny):
  _, model = tiny
  sampler = Sampler(model)
  greedy = sampler.generate(PROMPTS, SamplingParams(max_new_tokens=8))
  sampled = sampler.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8),
                             rng=jax.random.key(7))
  assert sampled.tokens == greedy.tokens


def test_sampling_is_reproducible_for_a_key(tiny):
  _, model = tiny
  sampler = Sampler(model)
  params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)
  a = sampler.generate(PROMPTS, params, rng=jax.random.key(3))
  b = sampler.generate(PROMPTS, params, rng=jax.random.key(3))
  c = sampler.generate(PROMPTS, params, rng=jax.random.key(4))
  assert a.tokens == b.tokens and a.tokens != c.tokens


def test_sharded_sampling_equals_unsharded(tmp_path):
  make_hf_model("Qwen2ForCausalLM", tmp_path, num_attention_heads=8, num_key_value_heads=4)
  model = load_hf(tmp_path)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  plain = Sampler(model).generate(PROMPTS, SamplingParams(max_new_tokens=6))
  sharded_sampler = Sampler(model, mesh=mesh)
  assert sharded_sampler.params["layers"][0]["q"].sharding.spec[1] == "tensor"  # [embed, heads, head_dim]
  assert sharded_sampler.generate(PROMPTS, SamplingParams(max_new_tokens=6)).tokens == plain.tokens


def test_bad_requests(tiny):
  _, model = tiny
  sampler = Sampler(model)
  with pytest.raises(ValueError, match="at least one token"):
    sampler.generate([[1], []])
  with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
    sampler.generate([[1]], stop_strings=["</query>"])
  with pytest.raises(ValueError, match="exceed the model's max_position_embeddings=256"):
    sampler.generate([[1] * 200], SamplingParams(max_new_tokens=100))
  with pytest.raises(ValueError, match=r"top_p=0 must be in \(0, 1\]"):
    SamplingParams(top_p=0)


@pytest.fixture(scope="module")
def smollm2(asset):
  folder = asset("smollm2-135m-instruct")
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  return tokenizer, reference, load_hf(folder)


def _chat(tokenizer, question):
  return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]


def test_smollm2_logits_match_transformers(smollm2):
  tokenizer, reference, model = smollm2
  ids = np.asarray([_chat(tokenizer, "Who composed the opera Carmen? Answer briefly.")])
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
  assert float(np.abs(got - expected).max() / np.abs(expected).max()) <= 1e-3


def test_smollm2_greedy_is_token_identical_to_transformers(smollm2):
  tokenizer, reference, model = smollm2
  questions = ["What is the capital of France?", "Who composed the opera Carmen?",
               "Write a haiku about the sea.", "How many legs does a spider have?"]
  prompts = [_chat(tokenizer, q) for q in questions]
  out = Sampler(model, tokenizer=tokenizer).generate(prompts, SamplingParams(max_new_tokens=32))
  for prompt, tokens in zip(prompts, out.tokens, strict=True):
    with torch.no_grad():
      expected = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert tokens == expected
  assert "Paris" in tokenizer.decode(out.tokens[0])
  assert out.finish_reasons[0] == "eos" and out.tokens[0][-1] == tokenizer.eos_token_id


def test_smollm2_stops_at_stop_string(smollm2):
  tokenizer, _, model = smollm2
  prompt = _chat(tokenizer, "What is the capital of France?")
  out = Sampler(model, tokenizer=tokenizer).generate([prompt], SamplingParams(max_new_tokens=32),
                                                     stop_strings=["Paris"])
  text = tokenizer.decode(out.tokens[0])
  assert out.finish_reasons == ["stop"]
  assert "Paris" in text and "Paris" not in tokenizer.decode(out.tokens[0][:-1])
