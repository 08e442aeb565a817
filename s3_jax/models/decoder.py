"""One Flax NNX decoder for the Llama (SmolLM2, Llama 3), Qwen2/2.5 and Qwen3 families, and its value-head
variant (the PPO critic).

Layers are stacked along a leading `layers` axis and run with `lax.scan` in training, so compile time does
not grow with depth; the sampler unstacks them (`unstack_layers`) into a buffer per weight and a KV cache
per layer, and loops over layers, which XLA:CPU runs ~2x faster per decode step.

The math lives in pure functions over plain arrays (`forward`, `lm_logits`); the modules hold
the parameters, each an `nnx.Param` tagged with logical axis names (`logical_axes` metadata) that
`s3_jax.sharding` maps onto the mesh.

Dimension letters in einsum strings: b batch, t query positions, s key positions, d embed, h heads,
k kv heads, g query heads per kv head, e head_dim, f mlp, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from s3_jax.kernels.cpu_matmul import PackedWeight
from s3_jax.models.config import DecoderConfig

_NEG_INF = float(np.finfo(np.float32).min)


class KVCache(NamedTuple):
  """One layer's keys `k[l] [batch, kv_heads, head_dim, slots]` (slots minor: a decode step's scores are one
  batched dot over them) and values `v[l] [batch, kv_heads, slots, head_dim]`, each layer its own buffer;
  which slots hold real tokens (`valid [batch, slots]`) and the next slot to write (`index`, shared by all
  rows). A bfloat16 cache's buffers hold its bits as uint16 (`cache_storage`, `cache_values`).

  Separate buffers per layer, not one stacked array: XLA:CPU reads a layer's slice of a stacked cache inside
  the layer loop at about half the speed of a buffer of its own, and decode attention is what bounds a decode
  step at rollout lengths (`benchmarks/decode_attention.py`)."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, config: DecoderConfig, batch: int, slots: int, dtype: Any) -> KVCache:
    kv, e = config.num_kv_heads, config.head_dim
    dtype = cache_storage(dtype)
    return cls(tuple(jnp.zeros((batch, kv, e, slots), dtype) for _ in range(config.num_layers)),
               tuple(jnp.zeros((batch, kv, slots, e), dtype) for _ in range(config.num_layers)),
               jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))

  @property
  def batch(self) -> int:
    return self.valid.shape[0]

  @property
  def slots(self) -> int:
    return self.valid.shape[1]


# A bfloat16 cache is kept as its bits (uint16): XLA:CPU widens a bfloat16 dynamic-update-slice to float32
# and back, a whole-buffer convert, write and convert that made every decode step rewrite every layer's cache
# (SmolLM2, batch 16, 1,088 slots: 125 ms a step over a bf16 cache against 91 ms over fp32;
# `benchmarks/decode_step.py`); on 16-bit integers the same write is an in-place copy of the new slots, and
# even a bitcast of a bf16 buffer to uint16 around the write still copies it. The CPU kernel reads the bits
# as bfloat16; XLA's attention views them as bfloat16 (`cache_values`).
_CACHE_BITS = {jnp.dtype(jnp.bfloat16): jnp.dtype(jnp.uint16)}


def cache_storage(dtype: Any) -> Any:
  """The dtype a cache of `dtype` values is kept in: uint16 bits for bfloat16, else `dtype` itself."""
  return _CACHE_BITS.get(jnp.dtype(dtype), jnp.dtype(dtype))


def cache_values(x: jax.Array) -> jax.Array:
  """A cache buffer's values: bfloat16 for uint16 bits, else `x` itself."""
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def to_cache(x: jax.Array, storage: Any) -> jax.Array:
  """`x` as a cache buffer of storage dtype `storage` (`cache_storage`)."""
  if jnp.dtype(storage) == jnp.uint16:
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
  return x.astype(storage)


def update_slice(buffer: jax.Array, update: jax.Array, starts: Sequence[Any]) -> jax.Array:
  """`update` written into the cache buffer `buffer` at `starts`, in `buffer`'s storage (in place)."""
  return jax.lax.dynamic_update_slice(buffer, to_cache(update, buffer.dtype), starts)


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """`params` with `layers` as a tuple of per-layer dicts, each weight its own buffer (call outside `jit`).

  The layout the sampler decodes with: a Python loop over layers on separate buffers runs XLA:CPU's dots
  and attention at full speed, where a scan (or an unrolled loop) over slices of the stacked weights does
  not (`benchmarks/README.md`, decode step). Training keeps the stacked layout (a scan, remat)."""
  layers = params["layers"]
  if isinstance(layers, (tuple, list)):
    return params
  count = next(iter(layers.values())).shape[0]
  return {**params, "layers": tuple({name: value[i] for name, value in layers.items()} for i in range(count))}


def dot(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """`einsum(equation, x, w)` with float32 accumulation, the result in `x`'s dtype.

  With bfloat16 operands XLA:CPU's fast (AMX/oneDNN) path needs a float32 result: the same einsum with a
  bfloat16 result runs at half the speed of float32 (`shared/reference/environment.md`, bf16 table).
  `w` is cast to `x`'s dtype first (float32 master weights, bfloat16 compute).
  """
  return jnp.einsum(equation, x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def _bf16_matmul(x, w):
  return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_matmul_fwd(x, w):
  return _bf16_matmul(x, w), (x, w)


def _bf16_matmul_bwd(residuals, ct):
  x, w = residuals
  ct = ct.astype(x.dtype)
  dx = jnp.dot(ct, w.astype(x.dtype).T, preferred_element_type=jnp.float32).astype(x.dtype)
  # The weight gradient as `im,mo->io` on a materialised transpose: XLA:CPU's bf16 `mi,mo->io` (contracting
  # both operands' leading dimension) is no faster than fp32; folded back into the dot it would be.
  xt = jax.lax.optimization_barrier(x.T)
  dw = jnp.dot(xt, ct, preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype)


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def dense(equation: str, x: jax.Array, w: jax.Array | PackedWeight, matmul: MatmulKernel | None = None
          ) -> jax.Array:
  """`dot(equation, x, w)` for a layer's weight matmul (`x [b, t, *in]`, `w [*in, *out]` ->
  `[b, t, *out]`), in bfloat16 as one 2-D matmul whose backward pass does every dot bf16 x bf16 -> f32 with
  the weight gradient's contraction minor (`benchmarks/README.md`, bf16 backward: the gradient of 30 MLP
  layers 1,963 -> 1,748 ms, against 2,363 in fp32). Other dtypes: `dot` itself (the same einsum as ever).
  A `PackedWeight` (the bf16 sampler's, `pack_weights`) is multiplied by `matmul` (`MatmulKernel`: no
  gradient) instead of XLA."""
  n_in = x.ndim - 2
  if w.shape[:n_in] != x.shape[2:]:
    raise ValueError(f"dense {equation!r}: x {x.shape} and w {w.shape} are not [b, t, *in] @ [*in, *out]")
  b, t = x.shape[:2]
  out = w.shape[n_in:]
  if isinstance(w, PackedWeight):
    if matmul is None or x.dtype != jnp.bfloat16:
      raise ValueError(f"dense {equation!r}: a packed weight needs bf16 x (got {x.dtype}) and the matmul "
                       f"kernel (matmul={matmul})")
    return matmul(x.reshape(b * t, -1), w, x.dtype).reshape(b, t, *out)
  if x.dtype != jnp.bfloat16:
    return dot(equation, x, w)
  rows = x.reshape(b * t, -1)
  w2 = w.reshape(int(np.prod(x.shape[2:])), -1)
  if b * t == 1:  # XLA:CPU's bf16 matrix-vector product is slow: multiply two rows (`_two_rows`)
    flat = _bf16_matmul(_two_rows(rows), w2)[:1]
  else:
    flat = _bf16_matmul(rows, w2)
  return flat.reshape(b, t, *out)


@dataclasses.dataclass(frozen=True)
class MatmulKernel:
  """A bf16 product by a weight outside XLA: `fn(x [m, k], w, out_dtype) -> [m, n]` (products exact, fp32
  sums) of a weight `pack(w, n_in)` laid out for it (a `PackedWeight`; `n_in`: the weight's input dims) —
  `kernels.cpu_matmul`'s on CPUs with AVX512-BF16, for the sampler's prefills and decode steps (XLA:CPU's
  bf16 product reads the weights at 1-12 GB/s for the few rows of a decode step and runs a prefill's at
  100-380 GFLOP/s). Not differentiable."""
  fn: Callable[..., jax.Array]
  pack: Callable[..., PackedWeight]

  def __call__(self, x: jax.Array, w: PackedWeight, out_dtype: Any) -> jax.Array:
    return self.fn(x, w, out_dtype)


# A layer's weight matmuls and how many leading dims of each weight its product contracts (`_layer`).
WEIGHT_INPUT_DIMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def pack_weights(params: dict[str, Any], matmul: MatmulKernel) -> dict[str, Any]:
  """`params` (unstacked layers, `unstack_layers`) with each layer's weight matmuls and `lm_head` packed for
  `matmul` (`MatmulKernel.pack`; a weight whose contraction is odd stays as it is, for XLA). Packed once per
  set of weights (the sampler's `set_params`), not per call."""
  def packed(w, n_in):
    if math.prod(w.shape[:n_in]) % 2:
      return w
    return _packer(matmul.pack, n_in)(w)

  layers = tuple({name: packed(w, WEIGHT_INPUT_DIMS[name]) if name in WEIGHT_INPUT_DIMS else w
                  for name, w in layer.items()} for layer in params["layers"])
  out = {**params, "layers": layers}
  if "lm_head" in params:
    out["lm_head"] = packed(params["lm_head"], 1)
  return out


@functools.cache
def _packer(pack: Callable[..., PackedWeight], n_in: int) -> Callable[[jax.Array], PackedWeight]:
  return jax.jit(lambda w: pack(w, n_in))


def _two_rows(x: jax.Array) -> jax.Array:
  """A one-row operand `[1, k]` padded with a zero row: XLA:CPU multiplies one bf16 row by a matrix 2-10x
  slower than two (one decode step's 576 x 49,152 logits: 39.6 ms for one row, 3.8 ms for two, 3.5 ms in
  fp32; `benchmarks/README.md`, bf16 decode steps), so a batch-1 decode step multiplies two and keeps one."""
  return jnp.pad(x, [(0, 1), (0, 0)])


def embed_rows(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """`table[tokens]` (token ids in range: `mode="clip"`). A uint16 table holds bf16 bits (the bf16 sampler's
  copy, `Sampler.set_params`): its rows are read as bits and then viewed as bf16. A bf16 table read as such
  in a decode loop made XLA:CPU (whose elementwise work on bf16 is fp32) move the rows' conversion to fp32
  before the gather and hoist it out of the loop: the whole table converted once per decode call (SmolLM2's
  49,152 x 576: 31 ms a call), and a bitcast of the whole table was copied likewise (15 ms a call)."""
  rows = jnp.take(table, tokens, axis=0, mode="clip")
  return jax.lax.bitcast_convert_type(rows, jnp.bfloat16) if table.dtype == jnp.uint16 else rows


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """`scale * x / sqrt(mean(x²) + eps)`, the statistics in float32 (as Hugging Face does)."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return normed.astype(x.dtype) * scale.astype(x.dtype)


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
  """Inverse rotary frequencies `[head_dim / 2]` in float32, with Llama-3 scaling when configured."""
  dim = config.head_dim
  inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)))
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  old_len = scaling.original_max_position_embeddings
  low_wavelen = old_len / scaling.low_freq_factor
  high_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((old_len / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates `x [b, t, heads, e]` by `positions [b, t]` (half-split layout, as Hugging Face)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, e/2]
  cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rotated * sin


def _scores(q, k):
  """q `[b, t, k, g, e]`, k `[b, k, s, e]` -> float32 scores `[b, k, g, t, s]`.

  One query position uses a broadcast multiply-reduce: on CPU it is ~3x faster than XLA's batched dot with
  a 1-row left operand, and it fuses without materialising the product.
  """
  if q.shape[1] == 1:
    product = q[:, 0, :, :, None, :].astype(jnp.float32) * k[:, :, None, :, :].astype(jnp.float32)
    return jnp.sum(product, axis=-1)[:, :, :, None, :]
  # Batch dimensions leading in every operand and the result: XLA:CPU runs this layout ~2x faster than
  # "btkge,bkse->bkgts" (measured, bf16 and fp32).
  return jnp.einsum("bkgte,bkse->bkgts", q.transpose(0, 2, 3, 1, 4), k, preferred_element_type=jnp.float32)


def _cached_scores(q, kt):
  """q `[b, t, k, g, e]`, cached keys kt `[b, k, e, s]` -> float32 scores `[b, k, g, t, s]`: one batched dot
  with the slots minor (a decode step over 1,088 slots: 1.5 ms a layer, against 2.5 ms for the multiply-reduce
  over `[b, k, s, e]`; `benchmarks/decode_attention.py`)."""
  q = q.transpose(0, 2, 3, 1, 4).astype(kt.dtype)
  return jnp.einsum("bkgte,bkes->bkgts", q, kt, preferred_element_type=jnp.float32)


def _mix(probs, v):
  """probs `[b, k, g, t, s]`, v `[b, k, s, e]` -> `[b, t, k, g, e]`."""
  if probs.shape[3] == 1 and probs.shape[4] == 1:  # one position over one key: a product
    return (probs[:, :, :, 0, :] * v.astype(probs.dtype))[:, None]
  # float32 probabilities against float32 values, or bfloat16 ones against bfloat16 values (AMX), f32 sums.
  # The result keeps the batch dimensions leading ("->btkge" directly: XLA:CPU has no bf16 x bf16 = f32
  # kernel for that layout, and in fp32 it is ~5x slower).
  out = jnp.einsum("bkgts,bkse->bkgte", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.transpose(0, 3, 1, 2, 4)


# Causal self-attention over more positions than this runs in query blocks of this many (`_attention`).
ATTENTION_BLOCK = 256


def _dense_attention(q, k, v, mask):
  """Grouped-query attention of q `[b, t, h, e]` over keys/values k/v `[b, k, s, e]`, allowed where
  `mask [b, t, s]`, with the whole `[t, s]` score matrix at once. Returns `[b, t, h, e]`."""
  b, t, h, e = q.shape
  q = q.reshape(b, t, k.shape[1], h // k.shape[1], e)
  scores = jnp.where(mask[:, None, None], _scores(q, k) / np.sqrt(e), _NEG_INF)
  return _mix(jax.nn.softmax(scores, axis=-1), v).astype(q.dtype).reshape(b, t, h, e)


def _attention(q, k, v, mask, block: int | None = None, prefix=None):
  """Causal self-attention of q `[b, t, h, e]` over the same positions' keys/values k/v `[b, k, t, e]`,
  allowed where `mask [b, t, t]` (which never allows a later position). Returns `[b, t, h, e]`.

  Over more than `block` (default `ATTENTION_BLOCK`) positions the queries go in blocks, each against the keys
  up to its own last position only: the same result (the skipped keys are masked for every query of the
  block) with about half the score work, and at most `block` query rows of the `[t, t]` scores held at once
  (t = 4,096: 9 heads x 16.8M fp32 scores = 604 MB a row, a layer, in one piece). SmolLM2's shapes, 4 rows,
  t = 4,096: forward 8.5 s -> 1.7 s, forward + backward 20.5 s -> 5.2 s, temporaries 4.8 -> 1.7 GB; blocks of
  256 beat 512 and 1,024 and are within 10% of 128, which doubles the ops to compile
  (`benchmarks/long_attention.py`).

  `prefix = (pk, pv)`, each `[1, k, p, e]`: keys/values of `p` earlier positions that every row shares and
  every query sees (`forward(..., prefix=...)`); they are broadcast over the rows, so their gradient is the
  sum over rows."""
  t = q.shape[1]
  block = block or ATTENTION_BLOCK

  def attend(start, end):
    kk, vv, m = k[:, :, :end], v[:, :, :end], mask[:, start:end, :end]
    if prefix is not None:
      b, p = q.shape[0], prefix[0].shape[2]
      kk = jnp.concatenate([jnp.broadcast_to(prefix[0], (b, *prefix[0].shape[1:])).astype(k.dtype), kk], 2)
      vv = jnp.concatenate([jnp.broadcast_to(prefix[1], (b, *prefix[1].shape[1:])).astype(v.dtype), vv], 2)
      m = jnp.concatenate([jnp.ones((b, end - start, p), bool), m], 2)
    return _dense_attention(q[:, start:end], kk, vv, m)

  if t <= block:
    return attend(0, t)
  return jnp.concatenate([attend(start, min(start + block, t)) for start in range(0, t, block)], axis=1)


def _cached_attention(q, kt, v, mask, kernel=None):
  """Grouped-query attention of q `[b, t, h, e]` over one layer's cache (keys kt `[b, k, e, s]`, values
  v `[b, k, s, e]`, the new tokens already written), allowed where `mask [b, t, s]`. `kernel(q, kt, v)`, when
  given, computes it instead (`_run_layers` binds the cache's valid slots and index to the CPU kernel)."""
  b, t, h, e = q.shape
  if kernel is not None:
    return kernel(q, kt, v).astype(q.dtype)
  kt, v = cache_values(kt), cache_values(v)
  q = q.reshape(b, t, kt.shape[1], h // kt.shape[1], e)
  if t > 1 and q.dtype == jnp.bfloat16 and kt.dtype != q.dtype:
    # A chunked prefill in bf16 over the sampler's fp32 cache: the scores' dot and the mix in bf16 with f32
    # sums (the cache cast per call, the scale folded into q), softmax in f32. It was fp32 throughout (q cast
    # up to the cache's dtype): a rollout's first-turn chunk (16 x 512 new tokens over 1,280 slots), 30
    # layers' attention 14.0 s -> 10.2 s (`benchmarks/extend_step.py`); attention is most of a chunked
    # prefill, and chunked prefill most of a warm rollout.
    q = (q.astype(jnp.float32) * (1.0 / np.sqrt(e))).astype(q.dtype)
    kt, v = kt.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.where(mask[:, None, None], _cached_scores(q, kt), _NEG_INF)
  else:
    scores = jnp.where(mask[:, None, None], _cached_scores(q, kt) / np.sqrt(e), _NEG_INF)
  return _mix(jax.nn.softmax(scores, axis=-1), v).astype(q.dtype).reshape(b, t, h, e)


def _layer(config: DecoderConfig, x, p, positions, inv_freq, mask, cached, prefix=None, kernel=None,
           matmul=None):
  """One pre-norm block: the new residual stream and this layer's keys/values — the fresh ones `[b, k, t, e]`,
  or with `cached = (kt, v, index)` (one layer's cache, `mask [b, t, slots]`) the cache with the new tokens
  written at slots `index ... + t` first (so the write is in place and attention reads one buffer), or with
  `prefix = (pk, pv)` (`[1, k, p, e]`) also attending to a shared prefix's keys/values. `kernel`:
  `_cached_attention`'s; `matmul`: `dense`'s."""
  dtype = x.dtype
  h = rms_norm(x, p["attn_norm"], config.rms_norm_eps)
  q = dense("btd,dhe->bthe", h, p["q"], matmul)
  k = dense("btd,dke->btke", h, p["k"], matmul)
  v = dense("btd,dke->btke", h, p["v"], matmul)
  if config.qkv_bias:
    q, k, v = q + p["q_bias"].astype(dtype), k + p["k_bias"].astype(dtype), v + p["v_bias"].astype(dtype)
  if config.qk_norm:
    q = rms_norm(q, p["q_norm"], config.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], config.rms_norm_eps)
  q = apply_rope(q, positions, inv_freq)
  k = apply_rope(k, positions, inv_freq).transpose(0, 2, 1, 3)
  v = v.transpose(0, 2, 1, 3)
  if cached is None:
    attn = _attention(q, k, v, mask, prefix=prefix)
  else:
    cached_k, cached_v, index = cached
    k = update_slice(cached_k, k.transpose(0, 1, 3, 2), (0, 0, 0, index))
    v = update_slice(cached_v, v, (0, 0, index, 0))
    attn = _cached_attention(q, k, v, mask, kernel)
  x = x + dense("bthe,hed->btd", attn, p["o"], matmul)
  h = rms_norm(x, p["mlp_norm"], config.rms_norm_eps)
  gate = dense("btd,df->btf", h, p["gate"], matmul)
  up = dense("btd,df->btf", h, p["up"], matmul)
  x = x + dense("btf,fd->btd", jax.nn.silu(gate) * up, p["down"], matmul)
  return x, (k, v)


# Gradient checkpointing policies: "full" keeps only each layer's input; "dots" also keeps the outputs of the
# weight matmuls (projections, MLP), so the backward pass recomputes only attention and elementwise work.
# searcher.remat: what each layer keeps for the backward pass (none: everything, no recomputation).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _run_layers(config, params, tokens, positions, attention_mask, cache, compute_dtype, remat="none",
                unroll=False, constrain=None, prefix=None, cache_attention=None, matmul=None):
  """The final-norm hidden states and each layer's fresh keys/values `[b, k, t, e]` (stacked `[layers, ...]`
  from a scan over stacked layers; a list from a loop over `unstack_layers`' per-layer buffers). `prefix`:
  a shared prefix's keys/values as `prefix_kv` returns them (stacked `[layers, 1, k, p, e]`)."""
  if prefix is not None and cache is not None:
    raise ValueError("a shared prefix and a KV cache are exclusive (the cache already holds the context)")
  t = tokens.shape[1]
  constrain = constrain or (lambda x: x)
  x = constrain(embed_rows(params["embed"], tokens).astype(compute_dtype))
  inv_freq = jnp.asarray(rope_inv_freq(config))
  mask = jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask[:, None, :]
  layers = params["layers"]
  kernel = None
  if cache is not None:
    if not isinstance(layers, (tuple, list)):
      layers = unstack_layers(params)["layers"]  # static slices: correct, slower (the sampler unstacks once)
    # query i sees every valid cached slot and the new tokens up to itself (slots index ... index + i)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, cache.index, axis=1)
    slots = jnp.arange(valid.shape[1])
    mask = valid[:, None, :] & (slots[None, None, :] <= cache.index + jnp.arange(t)[None, :, None])
    if cache_attention is not None:  # it derives the same mask from the valid slots and the index itself
      kernel = lambda q, kt, v: cache_attention(q, kt, v, valid, cache.index)  # noqa: E731
      mask = None
  if isinstance(layers, (tuple, list)):
    kvs = []
    for i, p in enumerate(layers):
      cached = None if cache is None else (cache.k[i], cache.v[i], cache.index)
      pre = None if prefix is None else (prefix[0][i], prefix[1][i])
      x, kv = _layer(config, x, p, positions, inv_freq, mask, cached, pre, kernel, matmul)
      x = constrain(x)
      kvs.append(kv)
    return rms_norm(x, params["final_norm"], config.rms_norm_eps), kvs

  def body(carry, layer):
    p, pre = layer
    x, kv = _layer(config, carry, p, positions, inv_freq, mask, None, pre)
    return constrain(x), kv

  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} must be one of {', '.join(REMAT_POLICIES)}")
  if remat != "none":  # gradient checkpointing: keep each layer's input, recompute its inside in the backward
    body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[remat])
  # A Python loop over per-layer slices was tried for bf16 on CPU (2026-12-04): no faster than the scan
  # (45.5 vs 43.9 s, a SmolLM2 update) and XLA:CPU then held every layer's activations despite the remat
  # (7.2 GB of temporaries against 0.34 GB), so the layers stay in a scan.
  x, (k_new, v_new) = jax.lax.scan(body, x, (layers, prefix), unroll=unroll)
  return rms_norm(x, params["final_norm"], config.rms_norm_eps), (k_new, v_new)


def prefill(config: DecoderConfig, params: dict[str, Any], tokens: jax.Array, attention_mask: jax.Array,
            slots: int, compute_dtype: Any = jnp.float32, unroll: bool = False,
            cache_dtype: Any = None, matmul: MatmulKernel | None = None) -> tuple[jax.Array, KVCache]:
  """Hidden states of left-padded prompts `[b, t]` and a fresh `slots`-slot cache holding their keys and
  values in `cache_dtype` (default: the compute dtype; bfloat16 kept as its bits, `cache_storage`) — no
  attention over an empty cache, which XLA would otherwise constant-fold for ages. `matmul`: `forward`'s."""
  attention_mask = attention_mask.astype(bool)
  hidden, fresh = _run_layers(config, params, tokens, default_positions(attention_mask), attention_mask, None,
                              compute_dtype, unroll=unroll, matmul=matmul)
  if not isinstance(fresh, list):  # stacked [layers, b, k, t, e]
    fresh = [(fresh[0][i], fresh[1][i]) for i in range(config.num_layers)]
  pad = slots - tokens.shape[1]
  valid = jnp.pad(attention_mask, [(0, 0), (0, pad)])
  dtype = cache_storage(cache_dtype or compute_dtype)
  k = tuple(jnp.pad(to_cache(k.transpose(0, 1, 3, 2), dtype), [(0, 0)] * 3 + [(0, pad)]) for k, _ in fresh)
  v = tuple(jnp.pad(to_cache(v, dtype), [(0, 0), (0, 0), (0, pad), (0, 0)]) for _, v in fresh)
  return hidden, KVCache(k, v, valid, jnp.int32(tokens.shape[1]))


def prefix_kv(config: DecoderConfig, params: dict[str, Any], tokens: jax.Array, *,
              compute_dtype: Any = jnp.float32, unroll: bool = False) -> tuple[jax.Array, jax.Array]:
  """Keys and values `[layers, 1, k, p, e]` (after RoPE) of a prefix `tokens [1, p]` at positions 0 ... p-1,
  for `forward(..., prefix=...)`: rows that all begin with the same p tokens (s3's ~650-token instruction
  template) compute them once instead of once a row. Stacked layers only (training's layout)."""
  if tokens.shape[0] != 1:
    raise ValueError(f"prefix_kv: one prefix row, got tokens of shape {tokens.shape}")
  p = tokens.shape[1]
  _, kv = _run_layers(config, params, tokens, jnp.arange(p, dtype=jnp.int32)[None], jnp.ones((1, p), bool),
                      None, compute_dtype, unroll=unroll)
  if isinstance(kv, list):
    raise ValueError("prefix_kv: stacked layers only (not unstack_layers' per-layer buffers)")
  return kv


def forward(config: DecoderConfig, params: dict[str, Any], tokens: jax.Array, positions: jax.Array, *,
            attention_mask: jax.Array | None = None, cache: KVCache | None = None,
            compute_dtype: Any = jnp.float32, remat: str = "none", unroll: bool = False,
            constrain: Callable[[jax.Array], jax.Array] | None = None,
            prefix: tuple[jax.Array, jax.Array] | None = None,
            cache_attention: Callable[..., jax.Array] | None = None,
            matmul: MatmulKernel | None = None) -> tuple[jax.Array, KVCache | None]:
  """Final-norm hidden states `[b, t, d]` for `tokens [b, t]` at `positions [b, t]`.

  `params["layers"]` is either stacked (`[layers, ...]` per weight: a `lax.scan` over layers, training) or a
  tuple of per-layer dicts (`unstack_layers`: a loop, the sampler's layout).
  Attention is causal over the `t` tokens and skips those where `attention_mask [b, t]` is 0. With a
  cache, the tokens also attend to every valid cached slot and are then written at slots
  `cache.index ... + t` (the same for every row: prompts are left-padded); the updated cache is returned.
  Each layer writes its new keys/values into its cache before attending over it, so XLA updates the cache
  in place inside a decode loop (a write after the read copied the whole cache every step).
  `remat` ("full", "dots": `REMAT_POLICIES`) recomputes each layer in the backward pass instead of storing
  its activations (training); "none" stores them.
  `unroll=True` unrolls the scan over layers (`sharding.unroll_loops`: a CPU mesh of several devices).
  `constrain` is applied to the residual stream after the embedding and after each layer (the learner keeps
  it sharded on its rows, so fsdp all-gathers weights instead of all-reducing activations).
  `prefix` (`prefix_kv`'s keys/values of p shared tokens) makes `tokens` the continuation of that prefix in
  every row: each attends to all p prefix positions, then causally to its own; `positions` start at p. The
  result equals the forward pass over the whole rows, restricted to the continuation, and gradients reach the
  parameters through the prefix's keys/values once (summed over rows) instead of once a row.
  `cache_attention` (with a cache) computes each layer's attention over the cache instead of XLA:
  `cache_attention(q, kt, v, valid, index)` as `kernels.cpu_attention.cached_attention` (the sampler's choice
  on CPU). `matmul` (`MatmulKernel`, with per-layer weights: the sampler's loop) multiplies the layers' weight
  matmuls instead of XLA.
  """
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), bool)
  attention_mask = attention_mask.astype(bool)
  x, fresh = _run_layers(config, params, tokens, positions, attention_mask, cache, compute_dtype, remat,
                         unroll, constrain, prefix, cache_attention, matmul)
  if cache is None:
    return x, None
  return x, KVCache(tuple(k for k, _ in fresh), tuple(v for _, v in fresh),
                    jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, cache.index, axis=1),
                    cache.index + t)


def lm_logits(params: dict[str, Any], hidden: jax.Array, matmul: MatmulKernel | None = None) -> jax.Array:
  """Float32 logits `[..., vocab]` from final hidden states (tied embeddings when there is no head).
  A packed `lm_head` (`pack_weights`: the bf16 sampler's) is multiplied by `matmul` instead of XLA."""
  rows = math.prod(hidden.shape[:-1])
  head = params.get("lm_head")
  if isinstance(head, PackedWeight):
    if matmul is None or hidden.dtype != jnp.bfloat16:
      raise ValueError(f"lm_logits: a packed lm_head needs bf16 hidden states (got {hidden.dtype}) and the "
                       f"matmul kernel (matmul={matmul})")
    return matmul(hidden.reshape(rows, -1), head, jnp.float32).reshape(*hidden.shape[:-1], -1)
  if hidden.dtype == jnp.bfloat16 and rows == 1:  # one row: `_two_rows`
    return lm_logits(params, _two_rows(hidden.reshape(1, -1)))[:1].reshape(*hidden.shape[:-1], -1)
  if head is not None:
    return jnp.einsum("...d,dv->...v", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
  return jnp.einsum("...d,vd->...v", hidden, params["embed"].astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """Positions that skip left padding: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# name -> (shape from config, logical axes); the leading "layers" axis marks stacked per-layer params.
def param_specs(config: DecoderConfig, lm_head: bool = True) -> dict[str, tuple[tuple[int, ...], tuple]]:
  c = config
  layer = {
      "attn_norm": ((c.hidden_size,), ("norm",)),
      "q": ((c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim")),
      "k": ((c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")),
      "v": ((c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim")),
      "o": ((c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed")),
      "mlp_norm": ((c.hidden_size,), ("norm",)),
      "gate": ((c.hidden_size, c.intermediate_size), ("embed", "mlp")),
      "up": ((c.hidden_size, c.intermediate_size), ("embed", "mlp")),
      "down": ((c.intermediate_size, c.hidden_size), ("mlp", "embed")),
  }
  if c.qkv_bias:
    layer["q_bias"] = ((c.num_heads, c.head_dim), ("heads", "head_dim"))
    layer["k_bias"] = ((c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"))
    layer["v_bias"] = ((c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"))
  if c.qk_norm:
    layer["q_norm"] = ((c.head_dim,), ("head_dim",))
    layer["k_norm"] = ((c.head_dim,), ("head_dim",))
  specs = {"embed": ((c.vocab_size, c.hidden_size), ("vocab", "embed"))}
  specs.update({f"layers.{name}": ((c.num_layers, *shape), ("layers", *axes))
                for name, (shape, axes) in layer.items()})
  specs["final_norm"] = ((c.hidden_size,), ("norm",))
  if lm_head and not c.tie_embeddings:
    specs["lm_head"] = ((c.hidden_size, c.vocab_size), ("embed", "vocab"))
  return specs


def nest_params(flat: dict[str, Any]) -> dict[str, Any]:
  """`{"embed": a, "layers.q": b}` -> `{"embed": a, "layers": {"q": b}}`, the layout `forward` takes."""
  nested: dict[str, Any] = {"layers": {}}
  for name, value in flat.items():
    if name.startswith("layers."):
      nested["layers"][name[len("layers."):]] = value
    else:
      nested[name] = value
  return nested


class _Params(nnx.Module):
  """A flat namespace of `nnx.Param`s (one attribute per parameter)."""


class Decoder(nnx.Module):
  """Causal LM: `model(input_ids [b, t] int32) -> logits [b, t, vocab] float32`.

  `param_dtype` is the storage dtype, `compute_dtype` the activation/matmul dtype (float32 or bfloat16).
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
               compute_dtype: Any = jnp.float32, lm_head: bool = True):
    self.config = config
    self.compute_dtype = compute_dtype
    init = jax.nn.initializers.normal(config.initializer_range)
    self.layers = _Params()
    for name, (shape, axes) in param_specs(config, lm_head).items():
      if name.endswith("norm") or name.endswith("_bias"):
        value = (jnp.ones if name.endswith("norm") else jnp.zeros)(shape, param_dtype)
      else:
        value = init(rngs.params(), shape, param_dtype)
      owner, attr = (self.layers, name[len("layers."):]) if name.startswith("layers.") else (self, name)
      setattr(owner, attr, nnx.Param(value, logical_axes=axes))

  def named_params(self) -> dict[str, nnx.Param]:
    """`{"embed": Param, "layers.q": Param, ...}` in the order of `param_specs`."""
    out = {}
    for name in param_specs(self.config, lm_head=hasattr(self, "lm_head")):
      owner, attr = (self.layers, name[len("layers."):]) if name.startswith("layers.") else (self, name)
      out[name] = getattr(owner, attr)
    return out

  def arrays(self) -> dict[str, Any]:
    """The parameters as the nested dict of arrays that `forward` takes."""
    return nest_params({name: param[...] for name, param in self.named_params().items()})

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    positions: jax.Array | None = None) -> jax.Array:
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    if positions is None:
      positions = default_positions(attention_mask)
    hidden, _ = forward(self.config, self.arrays(), input_ids, positions, attention_mask=attention_mask,
                        compute_dtype=self.compute_dtype)
    return hidden

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    return lm_logits(self.arrays(), self.hidden_states(input_ids, attention_mask, positions))


# -- the value head: a scalar per position, `{"kernel": [d], "bias": []}` wherever it lives (a separate
# critic's `value_head`, the actor's `value_head` with critic.separate_model=False, `value_head.*` in exports)
# ---------

VALUE_HEAD_AXES = {"kernel": ("embed",), "bias": ()}


# critic.head_init: the value head's kernel at the start (`init_value_head`).
VALUE_HEAD_INITS = ("normal", "zeros")


def init_value_head(config: DecoderConfig, rng: jax.Array, dtype: Any = jnp.float32, *,
                    kernel: str = "normal") -> dict[str, jax.Array]:
  """A fresh head with a zero bias and a normal(initializer_range) kernel (as HF initialises `score`) or,
  `kernel="zeros"`, a zero kernel: every value starts at 0 instead of a random projection of the hidden
  state (whose spread, ~0.02·|h|, is larger than a 0/1 reward's when the head learns slowly)."""
  if kernel == "zeros":
    return {"kernel": jnp.zeros((config.hidden_size,), dtype), "bias": jnp.zeros((), dtype)}
  if kernel != "normal":
    raise ValueError(f"value head kernel init {kernel!r} must be {' or '.join(VALUE_HEAD_INITS)}")
  return {"kernel": (jax.random.normal(rng, (config.hidden_size,)) * config.initializer_range).astype(dtype),
          "bias": jnp.zeros((), dtype)}


def apply_value_head(head: dict[str, jax.Array], hidden: jax.Array) -> jax.Array:
  """Values `[..., ]` (float32) of hidden states `[..., d]`: `hidden · kernel + bias`, accumulated in
  float32."""
  return jnp.einsum("...d,d->...", hidden, head["kernel"].astype(hidden.dtype),
                    preferred_element_type=jnp.float32) + head["bias"].astype(jnp.float32)


class ValueModel(nnx.Module):
  """PPO critic: the decoder backbone plus a scalar head per token, `model(input_ids) -> values [b, t]`."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
               compute_dtype: Any = jnp.float32):
    self.backbone = Decoder(config, rngs=rngs, param_dtype=param_dtype, compute_dtype=compute_dtype,
                            lm_head=False)
    self.value_head = _Params()
    for name, value in init_value_head(config, rngs.params(), param_dtype).items():
      setattr(self.value_head, name, nnx.Param(value, logical_axes=VALUE_HEAD_AXES[name]))

  @property
  def config(self) -> DecoderConfig:
    return self.backbone.config

  def named_params(self) -> dict[str, nnx.Param]:
    """The backbone's, then `value_head.kernel` and `value_head.bias`."""
    return {**self.backbone.named_params(),
            **{f"value_head.{name}": getattr(self.value_head, name) for name in VALUE_HEAD_AXES}}

  def head_arrays(self) -> dict[str, jax.Array]:
    return {name: getattr(self.value_head, name)[...] for name in VALUE_HEAD_AXES}

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    return apply_value_head(self.head_arrays(), self.backbone.hidden_states(input_ids, attention_mask,
                                                                            positions))
