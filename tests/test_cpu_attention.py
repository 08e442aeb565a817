"""The CPU cached-attention kernel (`s3_jax/kernels/cpu_attention.cc`: decode steps and chunked prefills)
against a float64 NumPy reference and the decoder's XLA attention, and the sampler with it against the
sampler with XLA's attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoder import make_hf_model

from s3_jax import sharding
from s3_jax.kernels import build, cpu_attention
from s3_jax.models.hf import load_hf
from s3_jax.models.sampler import Sampler, SamplingParams

# (batch, new positions, query heads, kv heads, head_dim, slots): decode steps (one position) and chunked
# prefills; SmolLM2-135M's heads; a partial last block; one kv head for 8 query heads and the largest
# head_dim; fewer slots than one block; more positions than one tile.
SHAPES = [(3, 1, 9, 3, 64, 100), (2, 1, 4, 2, 16, 37), (4, 1, 8, 1, 128, 64), (2, 1, 2, 2, 32, 5),
          (3, 7, 9, 3, 64, 100), (2, 13, 4, 2, 16, 37), (2, 5, 8, 1, 128, 64), (2, 3, 2, 2, 32, 5),
          (2, 40, 6, 2, 64, 90)]


def _reference(q, kt, v, valid, index):
  """Query i of row b: softmax(q.k / sqrt(e)) . v over the valid slots up to index + i, in float64; zeros
  where its own slot is not valid or it sees nothing."""
  b, t, h, e = q.shape
  k, s = kt.shape[1], kt.shape[3]
  qq = q.reshape(b, t, k, h // k, e).astype(np.float64)
  scores = np.einsum("btkge,bkes->btkgs", qq, kt.astype(np.float64)) / np.sqrt(e)
  seen = valid[:, None, :] & (np.arange(s)[None, None, :] <= index + np.arange(t)[None, :, None])
  seen &= valid[:, index:index + t, None]  # a padding position sees nothing
  seen = seen[:, :, None, None, :]
  scores = np.where(seen, scores, -np.inf)
  top = np.max(scores, -1, keepdims=True)
  weights = np.where(seen, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
  total = weights.sum(-1, keepdims=True)
  probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
  return np.einsum("btkgs,bkse->btkge", probs, v.astype(np.float64)).reshape(b, t, h, e)


def _inputs(rng, shape, dtype):
  b, t, h, k, e, s = shape
  q = (rng.normal(size=(b, t, h, e)) * 2).astype(np.float32)
  kt = jnp.asarray(rng.normal(size=(b, k, e, s)), dtype)
  v = jnp.asarray(rng.normal(size=(b, k, s, e)), dtype)
  index = s - t - int(rng.integers(0, min(3, s - t) + 1))  # new positions at index ... index + t - 1
  valid = rng.random((b, s)) < 0.6
  valid[:, 0] = True
  valid[0, : min(40, index)] = False  # whole blocks with nothing valid
  valid[:, index:index + t] = True
  valid[0, index] = t == 1  # a left-padding position, where a chunk has one
  valid[:, index + t:] = rng.random((b, s - index - t)) < 0.5  # stale slots past the new ones: never seen
  return q, kt, v, valid, index


@pytest.fixture(autouse=True)
def _kernel_builds():
  """The kernel must build wherever there is a C++ compiler; without one these tests say so and skip."""
  if build.compiler() is None:
    pytest.skip("no C++ compiler ($CXX, g++ or c++): the CPU kernel cannot be built here")
  usable, why = cpu_attention.status()
  assert usable, f"the kernel must build on the test machine: {why}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_numpy(shape, dtype):
  q, kt, v, valid, index = _inputs(np.random.default_rng(sum(shape)), shape, jnp.dtype(dtype))
  got = np.asarray(jax.jit(cpu_attention.cached_attention)(q, kt, v, valid, index))
  # the reference reads the same (bf16-rounded) cache values: only the kernel's arithmetic is under test
  v32 = np.asarray(v, np.float32)
  if dtype == "bfloat16" and q.shape[1] > 1 and cpu_attention.bf16_dots():
    # bf16 dot products: the query rounded to bf16 (to nearest even, as NumPy's ml_dtypes), exactly modelled;
    # each probability rounded to bf16 (relative 2^-9) before it weights the values and enters the total, so
    # the output is a convex mix of the same values whose normalised weights are each off by a factor within
    # (1 +- 2^-9) / (1 -+ 2^-9): within 2^-8 / (1 - 2^-9) of the largest |value| (plus fp32's 5e-6 as above).
    q_bf16 = np.asarray(jnp.asarray(q, jnp.bfloat16), np.float32)
    want = _reference(q_bf16, np.asarray(kt, np.float32), v32, valid, index)
    bound = 2.0**-8 / (1 - 2.0**-9) * np.abs(v32).max() + 5e-6
    assert np.abs(got - want).max() <= bound
    assert np.abs(got - want).mean() <= bound / 16  # rounding, not a bias: most weights are off far less
  else:
    want = _reference(q, np.asarray(kt, np.float32), v32, valid, index)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6)
  assert got.dtype == np.float32 and got.shape == want.shape


def test_kernel_equals_xla_attention_over_the_cache():
  """The decoder's own XLA attention over the same cache and mask (real positions only)."""
  from s3_jax.models.decoder import _cached_attention

  q, kt, v, valid, index = _inputs(np.random.default_rng(5), (2, 9, 9, 3, 64, 80), jnp.float32)
  t, s = q.shape[1], kt.shape[3]
  mask = valid[:, None, :] & (np.arange(s)[None, None, :] <= index + np.arange(t)[None, :, None])
  want = np.asarray(_cached_attention(jnp.asarray(q), kt, v, jnp.asarray(mask)))
  got = np.asarray(cpu_attention.cached_attention(q, kt, v, valid, index))
  real = valid[:, index:index + t]
  np.testing.assert_allclose(got[real], want[real], rtol=0, atol=5e-6)
  assert np.all(got[~real] == 0)


def test_extreme_scores_stay_finite_and_exact():
  """Scores spread over hundreds (one slot dominates, the others underflow) stay finite and within what
  float32 rounding of such scores allows (a score of 500 carries ~3e-5 of rounding into its exponent)."""
  q, kt, v, valid, index = _inputs(np.random.default_rng(2), (2, 4, 4, 2, 16, 70), jnp.float32)
  kt = kt * 200.0
  got = np.asarray(cpu_attention.cached_attention(q, kt, v, valid, index))
  assert np.all(np.isfinite(got))
  want = _reference(q, np.asarray(kt), np.asarray(v), valid, index)
  scores = np.einsum("btkge,bkes->btkgs", q.reshape(2, 4, 2, 2, 16), np.asarray(kt)) / 4.0  # head_dim 16
  assert np.abs(scores).max() > 300
  bound = 4 * np.finfo(np.float32).eps * np.abs(scores).max() * np.abs(np.asarray(v)).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=bound)


def test_bad_shapes_are_refused():
  q, kt, v, valid, index = _inputs(np.random.default_rng(3), (1, 1, 2, 2, 24, 8), jnp.float32)
  assert not cpu_attention.supports(2, 2, 24) and not cpu_attention.supports(18, 2, 64)
  with pytest.raises(ValueError, match="no kernel for 2 heads over 2 kv heads of dim 24"):
    cpu_attention.cached_attention(q, kt, v, valid, index)
  q, kt, v, valid, _ = _inputs(np.random.default_rng(3), (1, 4, 2, 2, 16, 8), jnp.float32)
  with pytest.raises(Exception, match=r"new positions at slots 6 \.\.\. \+4 past the cache's 8 slots"):
    jax.block_until_ready(cpu_attention.cached_attention(q, kt, v, valid, 6))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_kernel")
  make_hf_model("LlamaForCausalLM", folder, num_hidden_layers=3, max_position_embeddings=1024)
  return load_hf(folder), load_hf(folder, compute_dtype=jnp.bfloat16)


def test_the_kernel_is_taken_by_auto_on_avx512_cpus_only():
  assert cpu_attention.faster_here("fpu sse2 avx2 fma avx512f avx512bw avx512_bf16") == (True, "")
  fast, why = cpu_attention.faster_here("fpu sse2 avx avx2 fma")
  assert not fast and "the CPU has no AVX-512" in why
  assert not cpu_attention.faster_here("avx512fx avx2")[0]  # whole flags only


def test_sampler_uses_the_kernel_on_cpu_and_says_why_not_otherwise(tiny):
  model, _ = tiny
  sampler = Sampler(model)
  fast, why = cpu_attention.faster_here()
  assert (sampler.attention_kernel, sampler.cache_dtype) == ("cpu" if fast else "xla", jnp.float32)
  if not fast:
    assert sampler.attention_note == why
  assert Sampler(model, attention_kernel="cpu").attention_kernel == "cpu"  # wherever it runs
  assert Sampler(model, attention_kernel="xla").attention_kernel == "xla"
  with pytest.raises(ValueError, match="attention_kernel='gpu' must be one of auto, cpu, xla"):
    Sampler(model, attention_kernel="gpu")
  assert len(jax.devices()) >= 2, "the test session simulates several CPU devices (conftest.py)"
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  assert Sampler(model, mesh=mesh).attention_kernel == "xla"
  with pytest.raises(ValueError, match="the sampler's mesh has 2 devices"):
    Sampler(model, mesh=mesh, attention_kernel="cpu")


def test_sampler_with_the_kernel_equals_xla_attention_over_turns(tiny):
  """Greedy multi-turn sessions (the cache kept, rows of different lengths, compaction) give the same tokens
  with the kernel as with XLA's attention, and log-probs within float32 rounding."""
  model, _ = tiny
  rng = np.random.default_rng(4)
  kernel, xla = Sampler(model, attention_kernel="cpu"), Sampler(model, attention_kernel="xla")
  sessions = kernel.session(), xla.session()
  contexts = [rng.integers(1, 128, int(rng.integers(3, 60))).tolist() for _ in range(6)]
  for _ in range(3):
    limits = [int(rng.integers(2, 24)) for _ in contexts]
    outs = [s.generate(list(range(len(contexts))), contexts, SamplingParams(max_new_tokens=24),
                       max_new_tokens=limits) for s in sessions]
    assert outs[0].tokens == outs[1].tokens
    for got, want in zip(outs[0].logprobs, outs[1].logprobs, strict=True):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    contexts = [c + t + rng.integers(1, 128, int(rng.integers(1, 20))).tolist()
                for c, t in zip(contexts, outs[0].tokens, strict=True)]


def test_a_bf16_model_with_the_kernel_gives_the_xla_paths_tokens(tiny):
  """A bf16 model (bf16 prefills and decode steps over a bf16 cache kept as its bits): the kernel's greedy
  tokens equal XLA's attention's, log-probs within bf16 rounding."""
  _, model = tiny
  kernel, xla = Sampler(model, attention_kernel="cpu"), Sampler(model, attention_kernel="xla")
  assert kernel.attention_kernel == "cpu" and kernel.cache_dtype == xla.cache_dtype == jnp.bfloat16
  assert kernel.params["layers"][0]["q"].dtype == xla.params["layers"][0]["q"].dtype == jnp.bfloat16
  prompts = [np.random.default_rng(i).integers(1, 128, n).tolist() for i, n in enumerate((5, 40, 17))]
  a = kernel.generate(prompts, SamplingParams(max_new_tokens=16))
  b = xla.generate(prompts, SamplingParams(max_new_tokens=16))
  assert a.tokens == b.tokens
  for got, want in zip(a.logprobs, b.logprobs, strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2)
