"""The CPU matmul kernel (`kernels/cpu_matmul.cc`): bf16 products against NumPy (few rows: decode steps; many:
prefills; fp32 and bf16 results), and the sampler with it against XLA's products."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_decoder import make_hf_model

from s3_jax import sharding
from s3_jax.kernels import build, cpu_matmul
from s3_jax.models.hf import load_hf
from s3_jax.models.sampler import Sampler, SamplingParams

# (m, k, n): decode-step shapes (SmolLM2's 576 / 1,536), column counts that are not a multiple of the kernel's
# 64-column panels or 512-column tasks, contractions that end mid-block (blocks of 64 rows), one pair of rows;
# then more than 16 rows (the prefill path): rows that end mid-pass (6) and mid-task (192), a last panel of 32
# columns or fewer.
SHAPES = [(1, 576, 1536), (2, 1536, 576), (3, 64, 200), (16, 576, 192), (9, 66, 17), (12, 130, 1000),
          (13, 2, 33), (5, 128, 64), (16, 96, 4100), (7, 576, 49),
          (17, 576, 1536), (100, 64, 200), (385, 66, 100), (193, 1536, 576), (40, 2, 70), (64, 128, 96)]


@pytest.fixture(autouse=True)
def _kernel_builds():
  """The kernel builds wherever there is a C++ compiler; it runs where the CPU has AVX512-BF16."""
  if build.compiler() is None:
    pytest.skip("no C++ compiler ($CXX, g++ or c++): the CPU kernel cannot be built here")
  usable, why = cpu_matmul.status()
  if not usable and "AVX512-BF16" in why:
    pytest.skip(f"the matmul kernel does not run on this CPU: {why}")
  assert usable, f"the kernel must build on the test machine: {why}"


def _unpack(w):
  """The matrix [k, n] back from a PackedWeight's layout (NumPy: panel p, pair j, column c, row r of the pair
  at data[p, j, 2c + r])."""
  data = np.asarray(w.data)
  panels, pairs, _ = data.shape
  return data.reshape(panels, pairs, 64, 2).transpose(1, 3, 0, 2).reshape(2 * pairs, 64 * panels)[:, :w.n]


def _bf16(rng, *shape):
  return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_numpy(shape):
  """Exact bf16 products summed in fp32: within fp32 summation's bound of the float64 product of the same
  bf16 values (each step of the kernel's dot product adds two products: 2 roundings of 2^-24 a step)."""
  m, k, n = shape
  rng = np.random.default_rng(sum(shape))
  x, w = _bf16(rng, m, k), _bf16(rng, k, n)
  got = np.asarray(jax.jit(cpu_matmul.matmul)(jnp.asarray(x), jnp.asarray(w)))
  assert got.shape == (m, n) and got.dtype == np.float32
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  want = x64 @ w64
  bound = k * 2.0**-23 * (np.abs(x64) @ np.abs(w64))
  assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))
  # not vacuous: the error is far below the values themselves
  assert np.max(np.abs(got - want)) < 1e-3 * np.max(np.abs(want))


@pytest.mark.parametrize("shape", [(1, 576, 300), (16, 130, 70), (17, 576, 1536), (385, 66, 100)])
def test_bf16_result_is_the_fp32_result_rounded(shape):
  """A bf16 result is the fp32 sums rounded to nearest even, exactly (as NumPy's ml_dtypes rounds)."""
  m, k, n = shape
  rng = np.random.default_rng(sum(shape) + 1)
  x, w = jnp.asarray(_bf16(rng, m, k)), jnp.asarray(_bf16(rng, k, n))
  f32 = np.asarray(jax.jit(cpu_matmul.matmul)(x, w))
  b16 = jax.jit(lambda x, w: cpu_matmul.matmul(x, w, jnp.bfloat16))(x, w)
  assert b16.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(b16), f32.astype(ml_dtypes.bfloat16))


def test_kernel_takes_bf16_bits_and_matches_xla():
  """bf16's bits as uint16 (the sampler's cache dtype), the rows' and the packed weight's, multiply as bf16;
  the result agrees with XLA's own
  bf16 product with a float32 result within the same bound."""
  rng = np.random.default_rng(0)
  x, w = jnp.asarray(_bf16(rng, 4, 576)), jnp.asarray(_bf16(rng, 576, 300))
  bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
  call = jax.ffi.ffi_call(cpu_matmul.TARGET, jax.ShapeDtypeStruct((4, 300), jnp.float32))
  packed = cpu_matmul.pack(w).data
  got = np.asarray(call(bits, jax.lax.bitcast_convert_type(packed, jnp.uint16)))
  xla = np.asarray(jnp.dot(x, w, preferred_element_type=jnp.float32))
  bound = 576 * 2.0**-22 * np.asarray(jnp.dot(jnp.abs(x), jnp.abs(w), preferred_element_type=jnp.float32))
  assert np.all(np.abs(got - xla) <= bound)


def test_bad_shapes_are_errors():
  with pytest.raises(ValueError, match="out_dtype float16 must be float32 or bfloat16"):
    cpu_matmul.matmul(jnp.zeros((2, 4), jnp.bfloat16), jnp.zeros((4, 8), jnp.bfloat16), jnp.float16)
  x = jnp.zeros((2, 5), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"the contraction \(5\) must be even"):
    cpu_matmul.matmul(x, jnp.zeros((5, 8), jnp.bfloat16))
  with pytest.raises(ValueError,
                     match=r"x \(2, 4\) and w \(k=6, n=8\) are not \[m, k\] @ \[k, n\]"):
    cpu_matmul.matmul(jnp.zeros((2, 4), jnp.bfloat16), jnp.zeros((6, 8), jnp.bfloat16))
  with pytest.raises(ValueError,
                     match=r"the contraction of a weight of shape \(3, 5, 8\) \(15\) must be even"):
    cpu_matmul.pack(jnp.zeros((3, 5, 8), jnp.bfloat16), n_in=2)
  # the custom call itself checks what it is given
  call = jax.ffi.ffi_call(cpu_matmul.TARGET, jax.ShapeDtypeStruct((2, 8), jnp.float32))
  with pytest.raises(Exception, match="x and packed must be bfloat16"):
    jax.block_until_ready(call(jnp.zeros((2, 4), jnp.float32), jnp.zeros((1, 2, 128), jnp.float32)))
  with pytest.raises(Exception, match=r"shapes disagree .* packed \[1,3,128\]"):
    jax.block_until_ready(call(jnp.zeros((2, 4), jnp.bfloat16), jnp.zeros((1, 3, 128), jnp.bfloat16)))


def test_pack_lays_out_panels_of_pairs():
  """`pack`'s layout as the kernel reads it: panel p, pair j, column c holds w[2j + r, 64p + c] at 2c + r,
  zero past the weight's columns; a weight of several input dims packs as its matrix."""
  w = np.arange(6 * 70, dtype=np.float32).reshape(6, 70).astype(ml_dtypes.bfloat16)
  packed = cpu_matmul.pack(jnp.asarray(w))
  data = np.asarray(packed.data)
  assert data.shape == (2, 3, 128) and (packed.k, packed.n, packed.shape) == (6, 70, (6, 70))
  for p, j, c, r in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 2, 63, 1), (1, 1, 5, 0), (1, 2, 5, 1)]:
    assert data[p, j, 2 * c + r] == w[2 * j + r, 64 * p + c]
  assert np.all(data[1, :, 12:] == 0)  # columns 70 ... 127
  three = cpu_matmul.pack(jnp.asarray(w.reshape(2, 3, 70)), n_in=2)
  assert (three.k, three.n, three.shape) == (6, 70, (2, 3, 70))
  np.testing.assert_array_equal(np.asarray(three.data), data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_matmul")
  # tied embeddings, as SmolLM2's
  make_hf_model("LlamaForCausalLM", folder, num_hidden_layers=3, max_position_embeddings=1024,
                tie_word_embeddings=True)
  return load_hf(folder), load_hf(folder, compute_dtype=jnp.bfloat16)


def test_sampler_uses_the_kernel_in_bf16_and_says_why_not_otherwise(tiny):
  fp32, bf16 = tiny
  sampler = Sampler(bf16)
  assert sampler.matmul_kernel == "cpu"
  assert "lm_head" not in bf16.arrays()
  # tied embeddings: the sampler keeps the embedding transposed for the logits' product, and the table for
  # the lookups as its bf16 bits
  embed = np.asarray(bf16.arrays()["embed"].astype(jnp.bfloat16))
  head = sampler.params["lm_head"]
  assert isinstance(head, cpu_matmul.PackedWeight) and head.shape == embed.T.shape
  np.testing.assert_array_equal(_unpack(head), embed.T)
  # every layer's weight matmuls packed once, in the kernel's layout
  for name, n_in in (("q", 1), ("o", 2), ("down", 1)):
    want = np.asarray(bf16.arrays()["layers"][name][1].astype(jnp.bfloat16))
    got = sampler.params["layers"][1][name]
    assert isinstance(got, cpu_matmul.PackedWeight) and got.shape == want.shape
    np.testing.assert_array_equal(_unpack(got), want.reshape(int(np.prod(want.shape[:n_in])), -1))
  assert sampler.params["embed"].dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(sampler.params["embed"]), embed.view(np.uint16))
  assert Sampler(bf16, matmul_kernel="xla").matmul_kernel == "xla"
  assert "lm_head" not in Sampler(bf16, matmul_kernel="xla").params
  assert Sampler(fp32).matmul_kernel == "xla"
  assert "computes in float32" in Sampler(fp32).matmul_note
  with pytest.raises(ValueError, match="matmul_kernel='cpu': the CPU matmul kernel cannot run here: "
                     "the sampler computes in float32"):
    Sampler(fp32, matmul_kernel="cpu")
  with pytest.raises(ValueError, match="matmul_kernel='amx' must be one of auto, cpu, xla"):
    Sampler(bf16, matmul_kernel="amx")
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  assert Sampler(bf16, mesh=mesh).matmul_kernel == "xla"


def test_bf16_sessions_with_the_kernel_give_xlas_tokens(tiny):
  """Greedy multi-turn bf16 sessions (cache kept, rows of different lengths finishing at different steps, so
  decode batches of 1 to 20 rows; prefills and chunked prefills of many rows) give the same tokens with the
  kernel's products as with XLA's, log-probs within bf16 rounding."""
  _, model = tiny
  rng = np.random.default_rng(7)
  kernel, xla = Sampler(model), Sampler(model, matmul_kernel="xla")
  sessions = kernel.session(), xla.session()
  contexts = [rng.integers(1, 128, int(rng.integers(3, 50))).tolist() for _ in range(20)]
  for turn in range(3):
    rows = list(range(len(contexts))) if turn != 1 else [3]  # the second turn: one row alone
    limits = [int(rng.integers(2, 20)) for _ in rows]
    outs = [s.generate(rows, [contexts[r] for r in rows], SamplingParams(max_new_tokens=20),
                       max_new_tokens=limits) for s in sessions]
    assert outs[0].tokens == outs[1].tokens
    for got, want in zip(outs[0].logprobs, outs[1].logprobs, strict=True):
      np.testing.assert_allclose(got, want, rtol=0, atol=2e-2)
    for r, t in zip(rows, outs[0].tokens, strict=True):
      contexts[r] = contexts[r] + t + rng.integers(1, 128, int(rng.integers(1, 12))).tolist()
