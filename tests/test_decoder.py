"""The NNX decoder against PyTorch `transformers` (fp32, CPU) on random tiny configs of each family."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from s3_jax import sharding
from s3_jax.models import load_hf, save_hf
from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import Decoder, KVCache, ValueModel, cache_storage, forward, lm_logits

_CONFIGS = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config,
            "Qwen3ForCausalLM": transformers.Qwen3Config}
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa-untied": ("LlamaForCausalLM", {}),
    "llama-tied-llama3-rope": ("LlamaForCausalLM", {"tie_word_embeddings": True, "rope_theta": 500000.0,
                                                    "rope_scaling": _LLAMA3_ROPE}),
    "qwen2-qkv-bias": ("Qwen2ForCausalLM", {"rope_theta": 1000000.0}),
    "qwen2-tied-mha": ("Qwen2ForCausalLM", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", {"head_dim": 32}),
}


def make_hf_model(architecture, folder, seed=0, **overrides):
  """A tiny HF model with every parameter (biases and norm scales included) randomised, saved to folder."""
  base = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
  config = _CONFIGS[architecture](**{**base, **overrides})
  torch.manual_seed(seed)
  model = getattr(transformers, architecture)(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn_like(param) * (0.1 if "norm" in name else 0.05)
      param.copy_((1.0 if "norm" in name else 0.0) + noise)
  model.save_pretrained(folder)
  return model


def _ids(batch, length, seed=0, vocab=128):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length))


def _relative_error(got, ref):
  return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
  architecture, overrides = CASES[case]
  reference = make_hf_model(architecture, tmp_path, **overrides)
  model = load_hf(tmp_path)
  ids = _ids(2, 40)  # 40 > original_max_position_embeddings: the llama3 scaling matters
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  logits = model(jnp.asarray(ids, jnp.int32))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 40, 128)
  assert _relative_error(logits, expected) <= 1e-4


def test_left_padding_matches_the_unpadded_rows(tmp_path):
  reference = make_hf_model("Qwen2ForCausalLM", tmp_path)
  model = load_hf(tmp_path)
  rows = [_ids(1, 12, seed=1)[0], _ids(1, 7, seed=2)[0]]
  padded = np.zeros((2, 12), np.int64)
  mask = np.zeros((2, 12), bool)
  for i, row in enumerate(rows):
    padded[i, 12 - len(row):] = row
    mask[i, 12 - len(row):] = True
  logits = np.asarray(model(jnp.asarray(padded, jnp.int32), jnp.asarray(mask)))
  for i, row in enumerate(rows):
    with torch.no_grad():
      expected = reference(torch.tensor(row[None])).logits.numpy()[0]
    assert _relative_error(logits[i, 12 - len(row):], expected) <= 1e-4


def _numpy_attention(q, k, v, mask):
  """Grouped-query attention in NumPy float64: q `[b, t, h, e]`, k/v `[b, kv, s, e]`, mask `[b, t, s]`."""
  b, t, h, e = q.shape
  group = h // k.shape[1]
  out = np.zeros((b, t, h, e))
  for head in range(h):
    kk, vv = k[:, head // group].astype(np.float64), v[:, head // group].astype(np.float64)
    scores = np.einsum("bte,bse->bts", q[:, :, head].astype(np.float64), kk) / np.sqrt(e)
    scores = np.where(mask, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[:, :, head] = np.einsum("bts,bse->bte", probs, vv)
  return out


@pytest.mark.parametrize("block", [4, 5, 16, 64])
def test_query_blocked_causal_attention_matches_numpy_and_its_gradient_the_whole_matrix(block):
  from s3_jax.models.decoder import _attention, _dense_attention

  rng = np.random.default_rng(0)
  b, t, h, kv, e = 2, 23, 4, 2, 8  # 23 positions: a ragged last block for every block size but 64
  q, k, v = (rng.standard_normal(shape).astype(np.float32)
             for shape in ((b, t, h, e), (b, kv, t, e), (b, kv, t, e)))
  valid = np.ones((b, t), bool)
  valid[1, :6] = False  # row 1 left-padded by 6
  mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
  mask[1, :6, 0] = True  # padding queries see something (as in the model: their outputs are never used)
  got = np.asarray(_attention(*map(jnp.asarray, (q, k, v, mask)), block=block))
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), rtol=0, atol=2e-6)
  weights = jnp.asarray(rng.standard_normal((b, t, h, e)), jnp.float32)

  def loss(f, q, k, v):
    return jnp.sum(f(q, k, v, jnp.asarray(mask)) * weights)

  blocked = jax.grad(lambda *a: loss(lambda *x: _attention(*x, block=block), *a), argnums=(0, 1, 2))
  dense = jax.grad(lambda *a: loss(_dense_attention, *a), argnums=(0, 1, 2))
  for g_blocked, g_dense in zip(blocked(q, k, v), dense(q, k, v), strict=True):
    np.testing.assert_allclose(np.asarray(g_blocked), np.asarray(g_dense), rtol=0, atol=2e-5)


def test_blocked_attention_logits_match_transformers(tmp_path, monkeypatch):
  from s3_jax.models import decoder

  reference = make_hf_model("Qwen3ForCausalLM", tmp_path, head_dim=32)
  model = load_hf(tmp_path)
  ids = _ids(2, 40, seed=4)
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  monkeypatch.setattr(decoder, "ATTENTION_BLOCK", 16)  # 40 positions: blocks of 16, 16 and 8
  logits = model(jnp.asarray(ids, jnp.int32))
  assert _relative_error(logits, expected) <= 1e-4


def test_kv_cache_decode_equals_full_forward(tmp_path):
  make_hf_model("Qwen3ForCausalLM", tmp_path, head_dim=32)
  model = load_hf(tmp_path)
  params, config = model.arrays(), model.config
  ids = jnp.asarray(_ids(2, 20, seed=3), jnp.int32)
  mask = jnp.ones((2, 20), bool).at[1, :5].set(False)  # row 1 is left-padded by 5
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  full = lm_logits(params, forward(config, params, ids, positions, attention_mask=mask)[0])
  cache = KVCache.zeros(config, batch=2, slots=32, dtype=jnp.float32)
  hidden, cache = forward(config, params, ids[:, :12], positions[:, :12], attention_mask=mask[:, :12],
                          cache=cache)
  steps = [lm_logits(params, hidden)]
  for t in range(12, 20):
    hidden, cache = forward(config, params, ids[:, t:t + 1], positions[:, t:t + 1],
                            attention_mask=mask[:, t:t + 1], cache=cache)
    steps.append(lm_logits(params, hidden))
  incremental = jnp.concatenate(steps, axis=1)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(incremental)[real], np.asarray(full)[real], rtol=0, atol=1e-5)
  assert int(cache.index) == 20


@pytest.mark.parametrize("case", ["llama-tied-llama3-rope", "qwen2-qkv-bias", "qwen3-qk-norm"])
def test_export_round_trip_is_bit_identical_and_loads_in_transformers(case, tmp_path):
  architecture, overrides = CASES[case]
  make_hf_model(architecture, tmp_path / "src", **overrides)
  model = load_hf(tmp_path / "src")
  save_hf(model, tmp_path / "out")
  again = load_hf(tmp_path / "out")
  for (name, a), (_, b) in zip(model.named_params().items(), again.named_params().items(), strict=True):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=name)
  exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  ids = _ids(2, 24, seed=4)
  with torch.no_grad():
    expected = exported(torch.tensor(ids)).logits.numpy()
  assert _relative_error(model(jnp.asarray(ids, jnp.int32)), expected) <= 1e-4


def test_sharded_safetensors_export_and_import(tmp_path):
  make_hf_model("LlamaForCausalLM", tmp_path / "src")
  model = load_hf(tmp_path / "src")
  save_hf(model, tmp_path / "out", max_shard_bytes=100_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  again = load_hf(tmp_path / "out")
  ids = jnp.asarray(_ids(1, 9), jnp.int32)
  np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  with torch.no_grad():
    expected = reference(torch.tensor(np.asarray(ids))).logits.numpy()
  assert _relative_error(again(ids), expected) <= 1e-4


def test_value_model_backbone_matches_and_exports_as_token_classification(tmp_path):
  reference = make_hf_model("LlamaForCausalLM", tmp_path / "src")
  critic = load_hf(tmp_path / "src", value_head=True)
  assert isinstance(critic, ValueModel)
  ids = _ids(2, 10, seed=5)
  with torch.no_grad():
    hidden = reference.model(torch.tensor(ids)).last_hidden_state.numpy()
  kernel = np.asarray(critic.value_head.kernel.get_value())
  expected = hidden @ kernel + float(critic.value_head.bias.get_value())
  values = np.asarray(critic(jnp.asarray(ids, jnp.int32)))
  assert values.shape == (2, 10)
  np.testing.assert_allclose(values, expected, rtol=0, atol=1e-4 * np.abs(expected).max())

  save_hf(critic, tmp_path / "critic")
  exported = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "critic").eval()
  assert type(exported).__name__ == "LlamaForTokenClassification"
  with torch.no_grad():
    torch_values = exported(torch.tensor(ids)).logits.numpy()[..., 0]
  np.testing.assert_allclose(values, torch_values, rtol=0, atol=1e-4 * np.abs(torch_values).max())
  reloaded = load_hf(tmp_path / "critic", value_head=True)
  np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(ids, jnp.int32))), values)


def test_forward_sharded_over_eight_devices_equals_unsharded(tmp_path):
  make_hf_model("Qwen2ForCausalLM", tmp_path, num_attention_heads=8, num_key_value_heads=4,
                hidden_size=64, intermediate_size=128)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  sharded = load_hf(tmp_path, mesh=mesh)
  plain = load_hf(tmp_path)
  q = sharded.named_params()["layers.q"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 64, 2, 8)  # 8 heads split 4 ways
  ids = jnp.asarray(_ids(4, 16, seed=6), jnp.int32)
  ids_sharded = jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  params, config = sharded.arrays(), sharded.config

  @jax.jit
  def run(params, ids):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return lm_logits(params, forward(config, params, ids, positions)[0])

  np.testing.assert_allclose(np.asarray(run(params, ids_sharded)), np.asarray(plain(ids)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     r"unsupported architecture 'GPT2LMHeadModel' \(model_type 'gpt2'\); supported: LlamaForCausalLM"),
    (lambda c: c.update(intermediate_size=100),
     r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\), "
     r"but config.json implies \(100, 64\)"),
    (lambda c: c.update(num_hidden_layers=3), r"missing tensor 'model.layers.2.input_layernorm.weight'"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 2.0}),
     r"rope type 'yarn' is not supported"),
])
def test_bad_checkpoints_name_the_problem(tmp_path, edit, message):
  make_hf_model("LlamaForCausalLM", tmp_path)
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())
  edit(config)
  config.pop("rope_parameters", None) if "rope_scaling" in config else None
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=message):
    load_hf(tmp_path)


def test_missing_folder_keys_or_weights(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no config\.json"):
    load_hf(tmp_path)
  make_hf_model("LlamaForCausalLM", tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
    load_hf(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  del config["intermediate_size"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config\.json: missing key 'intermediate_size'"):
    load_hf(tmp_path)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_chunked_prefill_tracks_transformers(tmp_path, cache_dtype):
  """The sampler's chunked prefill: bf16 compute over an fp32 or bf16 KV cache (attention in bf16 with f32
  sums; a bf16 cache kept as its bits), in two chunks, then one decode step, against transformers' fp32
  logits of the whole rows."""
  reference = make_hf_model("Qwen3ForCausalLM", tmp_path, head_dim=32)
  ids = _ids(2, 21, seed=9)
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  model = load_hf(tmp_path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
  params, config = model.arrays(), model.config
  positions = jnp.broadcast_to(jnp.arange(21), (2, 21))
  cache = KVCache.zeros(config, batch=2, slots=32, dtype=cache_dtype)
  steps = []
  for start, end in ((0, 12), (12, 20), (20, 21)):
    chunk = jnp.asarray(ids[:, start:end], jnp.int32)
    hidden, cache = forward(config, params, chunk, positions[:, start:end], cache=cache,
                            compute_dtype=jnp.bfloat16)
    steps.append(lm_logits(params, hidden))
  assert cache.k[0].dtype == cache_storage(cache_dtype) and int(cache.index) == 21
  # the bf16 bound of test_bfloat16_compute_and_parameter_dtypes
  assert _relative_error(jnp.concatenate(steps, axis=1), expected) <= 1.6e-2


def test_bfloat16_compute_and_parameter_dtypes(tmp_path):
  reference = make_hf_model("Qwen3ForCausalLM", tmp_path, head_dim=32)
  ids = _ids(2, 24, seed=8)
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  mixed = load_hf(tmp_path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
  assert mixed.named_params()["layers.q"].get_value().dtype == jnp.float32
  logits = mixed(jnp.asarray(ids, jnp.int32))
  assert logits.dtype == jnp.float32
  # bfloat16 keeps 8 significant bits (relative step 2^-8 ≈ 4e-3); two layers of rounding stay within 4x that.
  assert _relative_error(logits, expected) <= 1.6e-2
  stored = load_hf(tmp_path, dtype=jnp.bfloat16)
  assert stored.named_params()["layers.q"].get_value().dtype == jnp.bfloat16
  assert _relative_error(stored(jnp.asarray(ids, jnp.int32)), expected) <= 1.6e-2


def _bf16(x):
  return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("equation, x_shape, w_shape", [("btd,df->btf", (2, 5, 16), (16, 24)),
                                                        ("bthe,hed->btd", (2, 5, 4, 8), (4, 8, 12))])
def test_dense_bfloat16_and_its_gradient_match_numpy(equation, x_shape, w_shape):
  """The bf16 weight matmul (one 2-D dot, a custom backward pass) against float64 NumPy on the same
  bf16-rounded operands: result, input gradient and (float32) weight gradient."""
  from s3_jax.models.decoder import dense

  rng = np.random.default_rng(3)
  x = rng.standard_normal(x_shape).astype(np.float32)
  w = rng.standard_normal(w_shape).astype(np.float32) * 0.2  # a float32 master
  out_shape = x_shape[:2] + w_shape[x.ndim - 2:]
  g = rng.standard_normal(out_shape).astype(np.float32)

  def loss(x, w):
    return jnp.sum(dense(equation, x.astype(jnp.bfloat16), w).astype(jnp.float32) * g)

  got = dense(equation, jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
  dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  assert got.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  m, i = x_shape[0] * x_shape[1], int(np.prod(x_shape[2:]))
  xb, wb, gb = _bf16(x).reshape(m, i), _bf16(w).reshape(i, -1), _bf16(g).reshape(m, -1)
  for value, ref in ((got, xb @ wb), (dx, gb @ wb.T), (dw, xb.T @ gb)):
    value = np.asarray(value, np.float64).reshape(ref.shape)
    # bf16 results: one rounding (2^-8 relative); f32 accumulation of bf16 products: far tighter
    assert np.abs(value - ref).max() <= 8e-3 * np.abs(ref).max(), (value, ref)
  # float32 is the einsum it always was
  np.testing.assert_array_equal(
      np.asarray(dense(equation, jnp.asarray(x), jnp.asarray(w))),
      np.asarray(jnp.einsum(equation, jnp.asarray(x), jnp.asarray(w), preferred_element_type=jnp.float32)))


@pytest.mark.parametrize("dtype, remat", [
    (jnp.float32, "none"), (jnp.float32, "dots"), (jnp.bfloat16, "full"), (jnp.bfloat16, "dots")])
def test_unrolled_layers_equal_the_scan_and_so_do_their_gradients(tmp_path, remat, dtype):
  """`unroll=True` (CPU meshes) against the rolled `lax.scan` over stacked layers, with the bf16 weight
  matmuls' custom backward (`dense`) inside remat: hidden states and every weight's gradient."""
  make_hf_model("Qwen2ForCausalLM", tmp_path, num_hidden_layers=3)
  model = load_hf(tmp_path)
  params, config = model.arrays(), model.config
  ids = jnp.asarray(_ids(2, 12, seed=4), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12), ids.shape)
  weights = jnp.asarray(np.random.default_rng(5).standard_normal((2, 12, config.hidden_size)), jnp.float32)

  def loss(params, unroll):
    hidden, _ = forward(config, params, ids, positions, compute_dtype=dtype, remat=remat, unroll=unroll)
    return jnp.sum(hidden.astype(jnp.float32) * weights), hidden.astype(jnp.float32)

  (_, h_scan), g_scan = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, False)
  (_, h_loop), g_loop = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, True)
  fp32 = dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(h_loop), np.asarray(h_scan), rtol=0,
                             atol=(1e-6 if fp32 else 2e-2) * float(np.abs(np.asarray(h_scan)).max()))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_scan), jax.tree.leaves(g_loop), strict=True):
    scale = float(np.abs(np.asarray(a)).max()) or 1.0
    # fp32: the same operations in another order; bf16: the two programs round bf16 activations at different
    # points (fusion), each at bf16's 2^-8
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=(1e-5 if fp32 else 3e-2) * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("block", [None, 8])
def test_a_shared_prefix_computed_once_matches_transformers_and_the_whole_rows_gradient(tmp_path, monkeypatch,
                                                                                      block):
  """Rows that begin with the same 24 tokens: the prefix's keys/values computed once at batch 1
  (`prefix_kv`), then each row's continuation (right-padded) against them, give transformers' logits of the
  whole rows, and the gradient of a loss over the continuations equals that of the whole-row forward pass."""
  from s3_jax.models import decoder

  if block:
    monkeypatch.setattr(decoder, "ATTENTION_BLOCK", block)  # 16 continuation positions: blocks of 8
  reference = make_hf_model("Qwen2ForCausalLM", tmp_path, rope_theta=1000000.0)
  model = load_hf(tmp_path)
  config, params = model.config, model.arrays()
  p, t = 24, 40
  ids = _ids(3, t, seed=7)
  ids[:, :p] = ids[0, :p]
  mask = np.ones((3, t), bool)
  mask[1, 33:] = False  # right padding, as training rows
  with torch.no_grad():
    expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
  rest = jnp.asarray(mask[:, p:])
  positions = decoder.default_positions(rest) + p

  def continuation(params):
    kv = decoder.prefix_kv(config, params, jnp.asarray(ids[:1, :p], jnp.int32))
    hidden, _ = forward(config, params, jnp.asarray(ids[:, p:], jnp.int32), positions, attention_mask=rest,
                        prefix=kv)
    return lm_logits(params, hidden)

  def whole(params):
    m = jnp.asarray(mask)
    hidden, _ = forward(config, params, jnp.asarray(ids, jnp.int32), decoder.default_positions(m),
                        attention_mask=m)
    return lm_logits(params, hidden)[:, p:]

  got = continuation(params)
  real = mask[:, p:]
  assert _relative_error(np.asarray(got)[real], expected[:, p:][real]) <= 1e-4

  def loss(fn):
    return lambda params: jnp.sum(jnp.where(real[..., None], jax.nn.log_softmax(fn(params)), 0.0)[..., 5])

  g_prefix, g_whole = jax.grad(loss(continuation))(params), jax.grad(loss(whole))(params)
  leaves = jax.tree.leaves(g_prefix)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_whole), leaves, strict=True):
    # float32 sums in another order: errors relative to the leaf's scale
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()),
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(g_whole["layers"]["k"]).max()) > 0  # the prefix's keys get a gradient to check


def test_a_bfloat16_cache_is_kept_as_its_bits():
  """A bf16 cache's buffers are uint16 holding bf16's bits: a prefill's keys/values and a decode step's new
  slot read back as the bf16 rounding (NumPy's) of the same values computed into an fp32 cache."""
  from s3_jax.models.decoder import cache_values, prefill

  config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16)
  params = Decoder(config, rngs=nnx.Rngs(5)).arrays()
  tokens = jnp.asarray(_ids(2, 7, seed=4, vocab=64), jnp.int32)
  mask = jnp.ones_like(tokens, bool)
  caches = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    _, cache = prefill(config, params, tokens, mask, 12, jnp.float32, cache_dtype=dtype)
    step = jnp.asarray([[3], [9]], jnp.int32)
    _, cache = forward(config, params, step, jnp.full((2, 1), 7), cache=cache, compute_dtype=jnp.float32)
    caches[dtype] = cache
  bits = caches[jnp.bfloat16]
  assert bits.k[0].dtype == bits.v[0].dtype == jnp.uint16 and cache_storage(jnp.bfloat16) == jnp.uint16
  for got, want in ((bits.k[0], caches[jnp.float32].k[0]), (bits.v[0], caches[jnp.float32].v[0])):
    # layer 0's keys/values depend on the tokens only, so they are the fp32 ones rounded, slot for slot
    np.testing.assert_array_equal(np.asarray(cache_values(got), np.float32), _bf16(want).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(bits.valid), np.asarray(caches[jnp.float32].valid))


def test_one_row_bfloat16_products_match_numpy():
  """A one-row bf16 weight matmul and logits (computed on two rows, `_two_rows`) against float64 NumPy on the
  same bf16-rounded operands."""
  from s3_jax.models.decoder import dense

  rng = np.random.default_rng(7)
  x = rng.standard_normal((1, 1, 16)).astype(np.float32)
  w = rng.standard_normal((16, 40)).astype(np.float32)
  got = dense("btd,df->btf", jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
  ref = _bf16(x).reshape(1, 16) @ _bf16(w)
  assert got.shape == (1, 1, 40) and got.dtype == jnp.bfloat16
  assert np.abs(np.asarray(got, np.float64).reshape(1, 40) - ref).max() <= 8e-3 * np.abs(ref).max()
  embed = rng.standard_normal((40, 16)).astype(np.float32)
  logits = lm_logits({"embed": jnp.asarray(embed)}, jnp.asarray(x[:, 0], jnp.bfloat16))
  assert logits.shape == (1, 40) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits, np.float64), _bf16(x[:, 0]) @ _bf16(embed).T, rtol=1e-5,
                             atol=1e-5)
