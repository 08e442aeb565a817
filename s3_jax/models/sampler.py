"""Jitted prefill + KV-cache decode over a batch of prompts of different lengths.

Prompts are left-padded to a shared length so every row writes the same cache slot at each step;
positions skip the padding. Decoding runs in jitted chunks of `chunk` steps (a `lax.while_loop` that
exits early once every row is done); between chunks the host checks stop strings, which token-level
checks cannot catch (`</query>` tokenises differently in different contexts).

Shapes are bucketed (batch, prompt length and new tokens rounded up to powers of two), so calls within
a bucket reuse the compiled functions. Returned log-probabilities are those of the sampled tokens under
the model's own distribution (log-softmax of the raw logits, before temperature, top-k and top-p): the
quantity PPO needs as old log-probs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from s3_jax import sharding as sharding_lib
from s3_jax import tracing
from s3_jax.kernels import cpu_attention, cpu_matmul
from s3_jax.models import tokenizer as tokenizer_lib
from s3_jax.models.decoder import (
  Decoder,
  KVCache,
  MatmulKernel,
  forward,
  lm_logits,
  pack_weights,
  prefill,
  unstack_layers,
)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """`temperature=0` is greedy; `top_k <= 0` and `top_p >= 1` are off; `ignore_eos` generates exactly
  `max_new_tokens` (benchmarks)."""

  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 128
  ignore_eos: bool = False

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.max_new_tokens < 0:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")


@dataclasses.dataclass
class SampleOutput:
  """Per prompt: generated ids (ending with the EOS token or the token that completes a stop string),
  their log-probs, and why generation ended (`eos`, `stop` or `length`)."""

  tokens: list[list[int]]
  logprobs: list[list[float]]
  finish_reasons: list[str]


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
  """Token ids `[b]` from float32 `logits [b, v]`: argmax when `greedy`, else a draw from `logits /
  temperature` restricted to the `top_k` largest and to the smallest set of tokens whose probability reaches
  `top_p` (always keeping the most likely token; tokens tied with the least likely kept one are kept too).

  No vocabulary sort and one random number per row: on XLA:CPU a sort of 16 x 49,152 logits cost more than
  a SmolLM2 decode step itself, and a Gumbel draw (one random number per token) a third of one
  (benchmarks/README.md). The top-p cut is found by bisection (`top_p_floor`), the draw by inverting the
  cumulative distribution (`draw_token`); both the set kept and the distribution are those of the sort."""
  if greedy:
    return first_max(logits)
  scaled = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  if use_top_p:
    scaled = jnp.where(_order_keys(scaled) < top_p_floor(scaled, top_p)[:, None], -jnp.inf, scaled)
  return draw_token(scaled, rng)


def first_max(logits: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, -1)` (the first of tied maxima) as two plain reductions: XLA:CPU's argmax, a
  reduction over (value, index) pairs, took ~4 ms for 16 x 49,152 logits where these take ~0.7 ms."""
  v = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)  # a row of NaNs (a broken model) still gives a valid id


def _order_keys(x: jax.Array) -> jax.Array:
  """int32 keys of float32 `x` in the floats' order (-inf lowest; NaN not expected)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def top_p_floor(scaled: jax.Array, top_p: jax.Array) -> jax.Array:
  """Per row of `scaled [b, v]`, the `_order_keys` key of the least likely token that top-p keeps: the
  smallest value x whose strictly more likely tokens hold less than `top_p` of the probability, which is
  exactly the cut of sorting the row and keeping the tokens while the mass before them is below `top_p`.
  Found by bisection over the 2^32 keys (32 masked sums over the row) instead of a sort."""
  keys = _order_keys(scaled)
  probs = jax.nn.softmax(scaled, axis=-1)

  def step(_, bounds):  # invariant: mass above `low` >= top_p (or low below every key), above `high` < top_p
    low, high = bounds
    mid = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without int32 overflow
    short = jnp.sum(jnp.where(keys > mid[:, None], probs, 0.0), axis=-1) < top_p
    return jnp.where(short, low, mid), jnp.where(short, mid, high)

  low = jnp.min(keys, axis=-1) - 1
  high = jnp.max(keys, axis=-1)
  return jax.lax.fori_loop(0, 32, step, (low, high))[1]


def draw_token(scaled: jax.Array, rng: jax.Array, block: int = 128) -> jax.Array:
  """A token id per row of `scaled [b, v]` (-inf: never), drawn with probability softmax(scaled), from one
  uniform number per row: the first token whose cumulative probability reaches it, found in two levels (the
  block of `block` tokens, then the token within it) so no scan runs over the whole vocabulary."""
  b, v = scaled.shape
  weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
  weights = jnp.pad(weights, [(0, 0), (0, -v % block)]).reshape(b, -1, block)
  ends = jnp.cumsum(jnp.sum(weights, axis=-1), axis=-1)  # [b, blocks]: cumulative weight at each block's end
  target = (1.0 - jax.random.uniform(rng, (b, 1))) * ends[:, -1:]  # in (0, total]
  chosen = jnp.minimum(jnp.sum(ends < target, axis=-1), ends.shape[1] - 1)  # first block reaching it
  pick = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]  # noqa: E731
  start = jnp.where(chosen > 0, pick(ends, jnp.maximum(chosen - 1, 0)), 0.0)
  inside = jnp.take_along_axis(weights, chosen[:, None, None], axis=1)[:, 0]  # [b, block]
  # The first token whose cumulative weight within the block reaches what is left of the target (> 0, so
  # a zero-weight token is never first); where rounding leaves it past the block's sum, its last
  # nonzero-weight token.
  offset = jnp.sum(jnp.cumsum(inside, axis=-1) < target - start[:, None], axis=-1)
  last = block - 1 - jnp.argmax(inside[:, ::-1] > 0, axis=-1)
  return (chosen * block + jnp.minimum(offset, last)).astype(jnp.int32)


# Sampler(attention_kernel=...): "auto" = the CPU kernel where it applies (CPU backend, one device, a
# compiler, supported head shapes) and is the faster one there (attention: an AVX-512 CPU), else XLA; "cpu" =
# the kernel or an error saying why not; "xla" = never.
ATTENTION_KERNELS = ("auto", "cpu", "xla")


def _pick_kernel(option: str, choice: str, mesh, unfit: str, status: Callable[[], tuple[bool, str]],
                 name: str, used: str,
                 faster: Callable[[], tuple[bool, str]] | None = None) -> tuple[str, str]:
  """("cpu" | "xla", why) for `Sampler(<option>=choice)` and a CPU kernel (`name`, for errors) that runs on a
  one-device CPU host where `status()` says it is usable; `unfit`, when not "", is why the model's settings
  rule it out; `used` is the note when it runs; `faster()`, when given, says whether "auto" should take it on
  this host ("cpu" takes it wherever it runs)."""
  if choice not in ATTENTION_KERNELS:
    raise ValueError(f"{option}={choice!r} must be one of {', '.join(ATTENTION_KERNELS)}")
  if choice == "xla":
    return "xla", "asked for"
  why = ""
  if jax.default_backend() != "cpu":
    why = f"the backend is {jax.default_backend()}"
  elif mesh is not None and mesh.devices.size > 1:
    why = f"the sampler's mesh has {mesh.devices.size} devices (the kernel runs on one)"
  elif unfit:
    why = unfit
  else:
    usable, why = status()
    if usable and choice == "auto" and faster is not None:
      usable, why = faster()
    if usable:
      return "cpu", used
  if choice == "cpu":
    raise ValueError(f"{option}='cpu': the CPU {name} kernel cannot run here: {why}")
  return "xla", why


def _pick_attention_kernel(choice: str, config, mesh) -> tuple[str, str]:
  """("cpu" | "xla", why) for `Sampler(attention_kernel=choice)`."""
  c = config
  unfit = ("" if cpu_attention.supports(c.num_heads, c.num_kv_heads, c.head_dim) else
           f"no kernel for {c.num_heads} heads over {c.num_kv_heads} kv heads of dim {c.head_dim}")
  return _pick_kernel("attention_kernel", choice, mesh, unfit, cpu_attention.status, "decode-attention",
                      "attention over the cache by the CPU kernel", cpu_attention.faster_here)


def _pick_matmul_kernel(choice: str, mesh, dtype) -> tuple[str, str]:
  """("cpu" | "xla", why) for `Sampler(matmul_kernel=choice)`: prefills' and decode steps' weight matmuls."""
  unfit = ("" if dtype == jnp.bfloat16 else
           f"the sampler computes in {jnp.dtype(dtype).name} (the kernel multiplies bf16)")
  return _pick_kernel("matmul_kernel", choice, mesh, unfit, cpu_matmul.status, "matmul",
                      "bf16 weight matmuls by the CPU kernel")


class Sampler:
  """Generates continuations of token-id prompts with a `Decoder`.

  `mesh` + `rules` place the weights for decoding (default `SAMPLING_RULES`: no fsdp on weights).
  """

  def __init__(self, model: Decoder, *, eos_token_ids: Sequence[int] = (), tokenizer: Any = None,
               pad_token_id: int = 0, mesh: Mesh | None = None,
               rules: sharding_lib.Rules = sharding_lib.SAMPLING_RULES, chunk: int = 16,
               min_prompt_bucket: int = 16, decode_dtype: Any = None, share_prefix: bool = True,
               attention_kernel: str = "auto", compute_dtype: Any = None, matmul_kernel: str = "auto"):
    self.config = model.config
    self.share_prefix = share_prefix  # sessions prefill new conversations' common start once
    # Prefill and chunked prefill compute in `compute_dtype` (default: the model's), whatever the weights'
    # dtype: training samples in `rollout.compute_dtype` from an actor updated in `searcher.compute_dtype`.
    self.compute_dtype = jnp.dtype(compute_dtype or model.compute_dtype)
    # Decode steps compute in the model's compute dtype unless told otherwise. A bf16 sampler keeps its
    # weights in bf16 (`set_params`: every matmul casts them to bf16 anyway, so the numbers are the same)
    # and its cache as bf16 bits (`decoder.cache_storage`): SmolLM2, batch 16, 1,088 slots, 54-55 ms a step
    # against 85-94 ms in fp32 (`benchmarks/decode_step.py`). The fp32 decode steps once used here on CPU
    # were faster only while a bf16 cache write copied the whole cache and one-row bf16 products were slow.
    self.decode_dtype = jnp.dtype(decode_dtype or self.compute_dtype)
    # Attention over the cache (decode steps and chunked prefills): the CPU kernel (`kernels.cpu_attention`)
    # or XLA's. The cache is in the decode steps' dtype.
    self.attention_kernel, self.attention_note = _pick_attention_kernel(attention_kernel, self.config, mesh)
    self.cache_attention = cpu_attention.cached_attention if self.attention_kernel == "cpu" else None
    # The weight matmuls of prefills and decode steps: the CPU kernel (`kernels.cpu_matmul`) where the sampler
    # computes in bf16 throughout and the host has AVX512-BF16, else XLA's.
    bf16 = self.compute_dtype == self.decode_dtype == jnp.bfloat16
    self.matmul_kernel, self.matmul_note = _pick_matmul_kernel(matmul_kernel, mesh,
                                                               jnp.bfloat16 if bf16 else self.decode_dtype)
    self.matmul = MatmulKernel(cpu_matmul.matmul, cpu_matmul.pack) if self.matmul_kernel == "cpu" else None
    self.cache_dtype = self.decode_dtype
    self.tokenizer = tokenizer
    self.pad_token_id = pad_token_id
    self.chunk = chunk
    self.min_prompt_bucket = min_prompt_bucket
    eos = set(eos_token_ids)
    for candidate in (self.config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
      if isinstance(candidate, int):
        eos.add(candidate)
      elif isinstance(candidate, list):
        eos.update(candidate)
    self.eos_token_ids = np.asarray(sorted(eos) or [-1], np.int32)
    self.mesh, self.rules = mesh, rules
    # Logical axes of each weight, a layer's without the leading "layers" axis (the sampler unstacks them).
    self._axes = {name.removeprefix("layers."): p.get_metadata()["logical_axes"][name.startswith("layers."):]
                  for name, p in model.named_params().items()}
    self._axes.setdefault("lm_head", ("embed", "vocab"))  # the transposed embedding `set_params` may add
    self.set_params(model.arrays())
    self.trace_counts = {"prefill": 0, "decode": 0, "extend": 0, "take": 0, "repack": 0, "gather_rows": 0,
                         "write_rows": 0}
    self.traces: list[tuple[str, str]] = []  # (function, `tracing.signature`) of every trace, in order
    self._prefill = jax.jit(self._prefill_fn)
    self._extend = jax.jit(self._extend_fn, donate_argnames=("cache",))
    self._take_rows = jax.jit(self._take_rows_fn)
    self._repack = jax.jit(self._repack_fn)
    self._gather_rows = jax.jit(self._gather_rows_fn, static_argnames=("start", "new"))
    self._write_rows = jax.jit(self._write_rows_fn, static_argnames=("start", "end"),
                               donate_argnames=("cache", "logits"))
    self._decode = jax.jit(self._decode_fn, static_argnames=("greedy", "top_k", "use_top_p", "ignore_eos"),
                           donate_argnames=("state",))

  def set_params(self, params: dict[str, Any]) -> None:
    """Samples from `params` (the nested arrays `Decoder.arrays()` returns, e.g. the trainer's latest actor)
    from now on, placed with the sampling rules. Same shapes, so nothing recompiles.

    The sampler keeps them unstacked (`decoder.unstack_layers`: one buffer per layer's weight), the layout
    its layer loop runs fastest on; `self.params` is that copy (in bf16 when the sampler computes in bf16:
    its matmuls, norms and embedding lookups cast the weights to bf16 anyway). With the matmul kernel a
    model with tied embeddings also gets `lm_head`, the embedding transposed (`[d, vocab]`, the kernel's
    layout; 56 MB for SmolLM2-135M), its weight matmuls packed in the kernel's layout (`decoder.pack_weights`)
    and the bf16 embedding table as its bits (uint16, `decoder.embed_rows`: XLA then converts no more than the
    rows it reads)."""
    params = unstack_layers(params)
    if self.compute_dtype == self.decode_dtype == jnp.bfloat16:  # bf16 everywhere: the matmuls' own rounding
      params = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            params)
    if self.matmul is not None and "lm_head" not in params:
      params = {**params, "lm_head": params["embed"].T}
    if self.matmul is not None:
      params = pack_weights(params, self.matmul)  # the kernel's layout, once per set of weights
      if params["embed"].dtype == jnp.bfloat16:
        # The logits read `lm_head`; the embedding is only looked up, kept as its bits (`decoder.embed_rows`).
        params = {**params, "embed": jax.lax.bitcast_convert_type(params["embed"], jnp.uint16)}
    if self.mesh is not None:
      def place(weights):
        return {name: x if name == "layers" else jax.device_put(
            x, sharding_lib.param_sharding(x.shape, self._axes[name], self.mesh, self.rules))
            for name, x in weights.items()}
      params = {**place(params), "layers": tuple(place(layer) for layer in params["layers"])}
    self.params = params

  def release_params(self) -> None:
    """Frees this copy of the weights until the next `set_params`: the trainer's reward, score and update
    stages do not sample, and each step's rollout loads the actor's new weights anyway (SmolLM2-135M in fp32:
    540 MB less at the update's peak)."""
    self.params = None

  # -- jitted bodies ---------------------------------------------------------------------------------

  def _state_shardings(self, state):
    """On a mesh, one placement for every decode state, whoever made it (`_decode_state` on the host, a
    decode chunk, a compaction): jit keys its cache on input shardings too, so a state placed differently
    would compile the decode loop again. The cache is split over kv heads as the rules say, the rest
    replicated."""
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    axes = (None, "kv_heads", None, None)
    cache = state["cache"]
    return {**{key: replicated for key in state if key != "cache"},
            "cache": KVCache(tuple(sharding_lib.param_sharding(x.shape, axes, self.mesh, self.rules)
                                   for x in cache.k),
                             tuple(sharding_lib.param_sharding(x.shape, axes, self.mesh, self.rules)
                                   for x in cache.v), replicated, replicated)}

  def _constrain_state(self, state):
    if self.mesh is None:
      return state
    return jax.lax.with_sharding_constraint(state, self._state_shardings(state))

  def _traced(self, name: str, *args, **static) -> None:
    """Runs at trace time only: counts the trace and keeps what it was for (`tracing.signature`)."""
    self.trace_counts[name] += 1
    self.traces.append((name, tracing.signature(*args, **static)))

  def _prefill_fn(self, params, tokens, mask, slots_like):
    self._traced("prefill", params, tokens, mask, slots_like)
    hidden, cache = prefill(self.config, params, tokens, mask, slots_like.shape[0], self.compute_dtype,
                            cache_dtype=self.cache_dtype, matmul=self.matmul)
    logits = lm_logits(params, hidden[:, -1], self.matmul)
    next_position = jnp.sum(mask, axis=1).astype(jnp.int32)
    return cache, logits, next_position

  def _decode_fn(self, params, state, temperature, top_p, *, greedy, top_k, use_top_p, ignore_eos):
    self._traced("decode", params, state, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                 ignore_eos=ignore_eos)
    eos = jnp.asarray(self.eos_token_ids)
    end = jnp.minimum(state["step"] + self.chunk, state["tokens"].shape[1])

    def cond(s):
      return (s["step"] < end) & ~jnp.all(s["done"])

    def body(s):
      rng, draw = jax.random.split(s["rng"])
      token = sample_logits(s["logits"], draw, temperature, top_p, greedy=greedy, top_k=top_k,
                            use_top_p=use_top_p)
      logprob = jnp.take_along_axis(jax.nn.log_softmax(s["logits"], axis=-1), token[:, None], axis=1)[:, 0]
      active = ~s["done"]
      token = jnp.where(active, token, self.pad_token_id)
      tokens = s["tokens"].at[:, s["step"]].set(token)
      logprobs = s["logprobs"].at[:, s["step"]].set(jnp.where(active, logprob, 0.0))
      count = s["count"] + active.astype(jnp.int32)
      hit_eos = active & jnp.isin(token, eos) & (not ignore_eos)
      done = s["done"] | hit_eos | (count >= s["max_new"])
      hidden, cache = forward(self.config, params, token[:, None], s["position"][:, None],
                              attention_mask=active[:, None], cache=s["cache"],
                              compute_dtype=self.decode_dtype, cache_attention=self.cache_attention,
                              matmul=self.matmul)
      return {**s, "rng": rng, "tokens": tokens, "logprobs": logprobs, "count": count, "done": done,
              "eos": s["eos"] | hit_eos, "cache": cache,
              "logits": lm_logits(params, hidden[:, 0], self.matmul),
              "position": s["position"] + active.astype(jnp.int32), "step": s["step"] + 1}

    return self._constrain_state(jax.lax.while_loop(cond, body, state))

  def _extend_fn(self, params, cache, tokens, mask, positions):
    """Chunked prefill into an existing cache: `tokens [b, t]` (left-padded, `mask`) at `positions`, written
    at `cache.index`; the last position's logits."""
    self._traced("extend", params, cache, tokens, mask, positions)
    hidden, cache = forward(self.config, params, tokens, positions, attention_mask=mask, cache=cache,
                            compute_dtype=self.compute_dtype, cache_attention=self.cache_attention,
                            matmul=self.matmul)
    return cache, lm_logits(params, hidden[:, -1], self.matmul)

  def _take_rows_fn(self, state, rows, padding):
    """The decode state of rows `rows [b']` only (compaction); `padding [b']` rows start done."""
    self._traced("take", state, rows, padding)
    take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
    out = {key: take(state[key]) for key in _ROW_KEYS}
    out["done"] = out["done"] | padding
    cache = state["cache"]
    out["cache"] = KVCache(tuple(map(take, cache.k)), tuple(map(take, cache.v)), take(cache.valid),
                           cache.index)
    return self._constrain_state({**out, "rng": state["rng"], "step": state["step"]})

  def _repack_fn(self, pieces, source, rows, slots, keep, slots_like, index):
    """A new cache whose row i holds, at slots `0 ... keep[i].sum()`, the entries `(rows[i], slots[i, j])`
    of cache `pieces[source[i]]` where `keep[i, j]` (every other slot empty), with `slots_like.shape[0]`
    slots. The pieces (caches of the same slots) are read where they are: one gather from each, a select
    between them, no concatenated copy of them all."""
    self._traced("repack", pieces, source, rows, slots, keep, slots_like, index)
    pad = slots_like.shape[0] - rows.shape[1]

    def gather(xs, at):  # row i from piece source[i]: `at(x, r)` reads piece x at rows r
      out = None
      for p, x in enumerate(xs):
        got = at(x, jnp.clip(rows, 0, x.shape[0] - 1))
        here = (source == p).reshape((-1,) + (1,) * (got.ndim - 1))
        out = got if out is None else jnp.where(here, got, out)
      return out

    # per layer: keys [b, kv, e, s] and values [b, kv, s, e] gathered to [b', s', kv, e], then laid out again
    layers_k = zip(*(c.k for c in pieces), strict=True)
    layers_v = zip(*(c.v for c in pieces), strict=True)
    new_k = tuple(jnp.pad(gather(layer, lambda x, r: x[r, :, :, slots]).transpose(0, 2, 3, 1),
                          [(0, 0)] * 3 + [(0, pad)]) for layer in layers_k)
    new_v = tuple(jnp.pad(gather(layer, lambda x, r: x[r, :, slots, :]).transpose(0, 2, 1, 3),
                          [(0, 0), (0, 0), (0, pad), (0, 0)]) for layer in layers_v)
    valid = gather([c.valid for c in pieces], lambda x, r: x[r, slots])
    return KVCache(new_k, new_v, jnp.pad(valid & keep, [(0, 0), (0, pad)]), index)

  # A length group's chunked prefill (`DecodeSession._extend_in_groups`) runs as three programs: the model's
  # extend is the one `_extend` compiles per (batch, cache) shape, and the copies around it compile cheaply.

  def _gather_rows_fn(self, cache, rows, *, start, new):
    """A cache of rows `rows [g]` of `cache` (`cache.batch`: a padding row, empty), their kept slots
    `0 ... start` and `new` empty slots after them, written from `start` on."""
    self._traced("gather_rows", cache, rows, start=start, new=new)

    def take(x, axis):
      x = jnp.take(jax.lax.slice_in_dim(x, 0, start, axis=axis), rows, axis=0, mode="fill", fill_value=0)
      return jnp.pad(x, [(0, new) if a == axis else (0, 0) for a in range(x.ndim)])

    return KVCache(tuple(take(x, 3) for x in cache.k), tuple(take(x, 2) for x in cache.v),
                   take(cache.valid, 1), jnp.int32(start))

  def _write_rows_fn(self, cache, logits, group, group_logits, rows, *, start, end):
    """`cache` and `logits [batch, vocab]` with rows `rows [g]` (`cache.batch`: dropped) replaced, in place:
    slots `start ...` of `group` (a `_gather_rows` cache, its `t` new slots filled by an extend) go to slots
    `end - t ... end`, `group_logits [g, vocab]` to `logits`."""
    self._traced("write_rows", cache, logits, group, group_logits, rows, start=start, end=end)
    t = group.slots - start

    def put_k(x, new):
      return x.at[rows, :, :, end - t:end].set(new[..., start:], mode="drop")

    def put_v(x, new):
      return x.at[rows, :, end - t:end, :].set(new[:, :, start:, :], mode="drop")

    cache = KVCache(tuple(map(put_k, cache.k, group.k)), tuple(map(put_v, cache.v, group.v)),
                    cache.valid.at[rows, end - t:end].set(group.valid[:, start:], mode="drop"), cache.index)
    logits = logits.at[rows].set(group_logits.astype(logits.dtype), mode="drop")
    return self._constrain_state({"cache": cache})["cache"], logits

  # -- host API -------------------------------------------------------------------------------------

  def fits(self, prompt_length: int, max_new_tokens: int) -> bool:
    """Whether a prompt of this length and `max_new_tokens` fit the model's positions once bucketed."""
    positions = (tracing.bucket_length(prompt_length, self.min_prompt_bucket)
                 + tracing.bucket_pow2(max(max_new_tokens, 1), self.chunk))
    return positions <= self.config.max_position_embeddings

  def _check_requests(self, prompts, params, max_new_tokens, stop_strings) -> list[int]:
    if self.params is None:
      raise RuntimeError("the sampler's weights were released (release_params): set_params first")
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    if stop_strings and self.tokenizer is None:
      raise ValueError("stop_strings need a tokenizer (Sampler(..., tokenizer=...))")
    limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
      raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
    return limits

  def _left_pad(self, rows: Sequence[Sequence[int]], batch: int, length: int):
    tokens = np.full((batch, length), self.pad_token_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for i, row in enumerate(rows):
      if len(row):
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = True
    mask[len(rows):, -1] = True  # padding rows hold one token so their softmax stays finite; they start done
    return tokens, mask

  def _decode_state(self, cache, logits, position, limits, batch, new_len, rng):
    max_new = np.zeros(batch, np.int32)
    max_new[:len(limits)] = limits
    state = {
        "cache": cache, "logits": logits, "position": position,
        "rng": rng if rng is not None else jax.random.key(0),
        "tokens": jnp.full((batch, new_len), self.pad_token_id, jnp.int32),
        "logprobs": jnp.zeros((batch, new_len), jnp.float32),
        "count": jnp.zeros(batch, jnp.int32), "max_new": jnp.asarray(max_new),
        "done": jnp.asarray(max_new == 0), "eos": jnp.zeros(batch, bool), "step": jnp.zeros((), jnp.int32),
    }
    return state if self.mesh is None else jax.device_put(state, self._state_shardings(state))

  def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(), *,
               max_new_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
               rng: jax.Array | None = None) -> SampleOutput:
    """Continues each prompt (a list of token ids). `max_new_tokens` overrides `params.max_new_tokens`
    per row. Stop strings need the `tokenizer` given at construction."""
    limits = self._check_requests(prompts, params, max_new_tokens, stop_strings)
    n, longest = len(prompts), max(len(p) for p in prompts)
    batch = tracing.bucket_pow2(n, 1)
    prompt_len = tracing.bucket_length(longest, self.min_prompt_bucket)
    new_len = tracing.bucket_pow2(max(max(limits), 1), self.chunk)
    if prompt_len + new_len > self.config.max_position_embeddings:
      raise ValueError(f"prompt bucket {prompt_len} + {new_len} new tokens exceed the model's "
                       f"max_position_embeddings={self.config.max_position_embeddings}")
    tokens, mask = self._left_pad(prompts, batch, prompt_len)
    cache, logits, position = self._prefill(self.params, tokens, mask, np.zeros(prompt_len + new_len, bool))
    state = self._decode_state(cache, logits, position, limits, batch, new_len, rng)
    pieces = self._run_decode(state, list(range(n)) + [-1] * (batch - n), params, stop_strings,
                              keep_cache=False)
    return self._outputs(pieces, n, stop_strings)

  def _run_decode(self, state, owners: list[int], params: SamplingParams, stop_strings: Sequence[str], *,
                  keep_cache: bool) -> list[_Piece]:
    """Decodes in chunks until every row is done. Between chunks, rows that hit a stop string are marked
    done, and once the rows still running fit a smaller batch bucket the finished ones are set aside (their
    tokens, and their cache when `keep_cache`) and decoding goes on over the running rows only, so finished
    rows cost no more decode steps. `owners[i]` is the request of row i (-1: padding). Returns the pieces
    the rows ended in, each with its owners."""
    greedy = params.temperature == 0
    static = {"greedy": greedy, "top_k": 0 if greedy else max(params.top_k, 0),
              "use_top_p": not greedy and params.top_p < 1, "ignore_eos": params.ignore_eos}
    temperature = jnp.float32(params.temperature if not greedy else 1.0)
    top_p = jnp.float32(params.top_p)
    new_len = state["tokens"].shape[1]
    pieces = []
    while True:
      state = self._decode(self.params, state, temperature, top_p, **static)
      done = np.asarray(state["done"])
      if stop_strings:
        newly = self._stop_string_rows(np.asarray(state["tokens"]), np.asarray(state["count"]),
                                       ~done & (np.asarray(owners) >= 0), stop_strings)
        if newly.any():
          done = done | newly
          state["done"] = jnp.asarray(done)
      if done.all() or int(state["step"]) >= new_len:
        break
      running = np.flatnonzero(~done).tolist()
      batch = tracing.bucket_pow2(len(running), 1)
      if batch < len(owners):  # compact: set the finished rows aside, decode the running ones only
        finished = [i for i in np.flatnonzero(done) if owners[i] >= 0]
        if finished:
          pieces.append(self._piece(state, finished, owners, keep_cache))
        rows = running + [running[0]] * (batch - len(running))
        padding = np.arange(batch) >= len(running)
        state = self._take_rows(state, np.asarray(rows, np.int32), padding)
        owners = [owners[i] for i in running] + [-1] * (batch - len(running))
    real = [i for i, owner in enumerate(owners) if owner >= 0]
    pieces.append(self._piece(state, real, owners, keep_cache, whole=True))
    return pieces

  def _piece(self, state, rows: list[int], owners: list[int], keep_cache: bool,
             whole: bool = False) -> _Piece:
    cache, cache_rows = None, rows
    if keep_cache:
      if whole:
        cache = state["cache"]
      else:  # the finished rows' cache, padded to a batch bucket (one compiled take per bucket pair)
        padded = rows + [rows[0]] * (tracing.bucket_pow2(len(rows), 1) - len(rows))
        taken = self._take_rows(state, np.asarray(padded, np.int32), np.zeros(len(padded), bool))
        cache, cache_rows = taken["cache"], list(range(len(rows)))
    host = {key: np.asarray(state[key])[rows] for key in ("tokens", "logprobs", "count", "eos")}
    return _Piece([owners[i] for i in rows], host["tokens"], host["logprobs"], host["count"], host["eos"],
                  cache, cache_rows)

  def _stop_string_rows(self, tokens, counts, candidates, stop_strings) -> np.ndarray:
    hits = np.zeros(len(candidates), bool)
    for i in np.flatnonzero(candidates):
      hits[i] = self._has_stop(tokens[i, :counts[i]], stop_strings)
    return hits

  def _has_stop(self, ids: Sequence[int], stop_strings: Sequence[str]) -> bool:
    text = self.tokenizer.decode(list(ids))
    return any(s in text for s in stop_strings)

  def _cut(self, ids: list[int], eos: bool, stop_strings) -> tuple[list[int], str]:
    reason = "eos" if eos else "length"
    if stop_strings:
      n = tokenizer_lib.stop_prefix_length(ids, self.tokenizer.decode, stop_strings)
      if n is not None:
        ids, reason = ids[:n], "stop"
    return ids, reason

  def _outputs(self, pieces: list[_Piece], n: int, stop_strings) -> SampleOutput:
    rows: list[Any] = [None] * n
    for piece in pieces:
      for j, owner in enumerate(piece.owners):
        rows[owner] = (piece, j)
    out = SampleOutput([], [], [])
    for piece, j in rows:
      ids, reason = self._cut(piece.tokens[j, :piece.count[j]].tolist(), bool(piece.eos[j]), stop_strings)
      out.tokens.append(ids)
      out.logprobs.append(piece.logprobs[j, :len(ids)].tolist())
      out.finish_reasons.append(reason)
    return out

  def session(self) -> DecodeSession:
    """A `DecodeSession`: multi-turn generation that keeps each conversation's KV cache between calls."""
    return DecodeSession(self)


_ROW_KEYS = ("logits", "position", "tokens", "logprobs", "count", "max_new", "done", "eos")


@dataclasses.dataclass
class _Piece:
  """Rows that finished decoding together: their requests, sampled tokens, log-probs, counts, EOS flags and,
  when kept, the cache they live in (row `cache_rows[j]` of `cache` holds request `owners[j]`)."""

  owners: list[int]
  tokens: np.ndarray
  logprobs: np.ndarray
  count: np.ndarray
  eos: np.ndarray
  cache: KVCache | None
  cache_rows: list[int]


@dataclasses.dataclass
class _Cached:
  """What the cache holds for one conversation: its token ids in order, and where each one is (which
  piece, which row of it, which slot)."""

  tokens: list[int]
  piece: int
  row: int
  slots: np.ndarray


# New conversations share a prefix when their common leading tokens, rounded down to this, are at least this.
SHARED_PREFIX_MULTIPLE = 64


# The work of a chunked prefill in query-slot pairs per new token: each new token's weight matmuls cost about
# what its attention over this many cache slots costs (SmolLM2-135M on a 2-core avx512_bf16 CPU, bf16: ~0.7 ms
# of matmuls a token, ~0.7 us of attention a token and slot; benchmarks/extend_step.py).
EXTEND_TOKEN_SLOTS = 1024
# A further length group is used only when it saves at least this share of the one-group work: each group is
# another compiled shape (batch bucket x chunk bucket) and another call.
EXTEND_GROUP_SAVING = 0.05


def _length_groups(lengths: Sequence[int], minimum: int, prefix_slots: int = 0,
                   max_groups: int = 4) -> list[list[int]]:
  """Rows to extend together: up to `max_groups` groups of rows of neighbouring lengths, the split of least
  padded work. A group of rows costs its batch bucket x chunk bucket new tokens, each attending to the
  `prefix_slots` cached slots and the group's own chunk (`DecodeSession` gives each group a cache of just
  those slots), plus `EXTEND_TOKEN_SLOTS` for its weight matmuls. Found by dynamic programming over the rows
  sorted by length; a further group must save `EXTEND_GROUP_SAVING` of the one-group work."""
  n = len(lengths)
  order = sorted(range(n), key=lambda i: lengths[i])

  def cost(a, b):  # rows order[a:b] as one group
    chunk = tracing.bucket_length(lengths[order[b - 1]], minimum)
    return tracing.bucket_pow2(b - a, 1) * chunk * (EXTEND_TOKEN_SLOTS + prefix_slots + chunk)

  # best[g][j]: the least work of rows order[:j] in g groups, and where its last group starts
  best = [[(0.0, 0)] + [(np.inf, 0)] * n]
  for g in range(1, min(max_groups, n) + 1):
    best.append([(np.inf, 0)] + [min((best[g - 1][a][0] + cost(a, j), a) for a in range(j))
                                 for j in range(1, n + 1)])
  whole = best[1][n][0]
  groups = min(range(1, len(best)), key=lambda g: best[g][n][0] + (g - 1) * EXTEND_GROUP_SAVING * whole)
  cuts, end = [], n
  for g in range(groups, 0, -1):
    start = best[g][end][1]
    cuts.append(sorted(order[start:end]))
    end = start
  return cuts[::-1]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  if n == 0:
    return 0
  diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(diff[0]) if len(diff) else n


class DecodeSession:
  """Multi-turn generation over one `Sampler` that keeps each conversation's KV cache between calls.

  `generate(keys, contexts, ...)` continues each context (the whole token sequence so far: the earlier
  turns' sampled ids and whatever the caller appended). For a key seen before, the cached keys/values of the
  longest common prefix of the cached sequence and the new context are kept, and only the rest of the
  context is prefilled (chunked prefill into the existing cache, at that conversation's own positions); a
  cached token the context no longer has (the part of a turn cut after a stop string, a dropped EOS) is
  dropped from the cache. The result equals `Sampler.generate` on the same contexts (up to float rounding:
  cached keys/values were computed one token at a time). Keys absent from a call are forgotten (their cache
  is freed); a change of the sampler's parameters (`set_params`) forgets everything.

  Between calls the caches of all conversations are packed into one fresh cache (valid slots first), sized
  by bucket: `tracing.bucket_length` of the longest kept prefix, of the new tokens and of the new-token limit.

  New conversations that all begin with the same tokens (s3's prompt: a 651-token instruction template
  before the question) prefill those once, at batch 1, and every row continues from that cache
  (`_share_prefix`): a rollout's first turn of 16 ~1,000-token prompts prefills ~6k tokens instead of ~16k.
  """

  def __init__(self, sampler: Sampler):
    self.sampler = sampler
    self._cached: dict[Any, _Cached] = {}
    self._pieces: list[KVCache] = []
    self._params = sampler.params
    self.reused_tokens = 0  # context tokens taken from the cache instead of prefilled (all calls)
    self.prefilled_tokens = 0
    self.shared_prefix_tokens = 0  # of those prefilled, the shared prefixes (once for all their rows)

  def close(self) -> None:
    """Frees every cache."""
    self._cached, self._pieces = {}, []

  def generate(self, keys: Sequence[Any], contexts: Sequence[Sequence[int]],
               params: SamplingParams = SamplingParams(), *, max_new_tokens: Sequence[int] | None = None,
               stop_strings: Sequence[str] = (), rng: jax.Array | None = None) -> SampleOutput:
    s = self.sampler
    limits = s._check_requests(contexts, params, max_new_tokens, stop_strings)
    if len(keys) != len(contexts) or len(set(keys)) != len(keys):
      raise ValueError(f"need one distinct key per context, got {len(keys)} keys for {len(contexts)} "
                       "contexts")
    for context, limit in zip(contexts, limits, strict=True):
      if len(context) + limit > s.config.max_position_embeddings:
        raise ValueError(f"a context of {len(context)} tokens + {limit} new tokens exceeds the model's "
                         f"max_position_embeddings={s.config.max_position_embeddings}")
    if s.params is not self._params:  # new weights: every cached key/value is stale
      self.close()
      self._params = s.params
    n = len(contexts)
    kept = []
    for key, context in zip(keys, contexts, strict=True):
      cached = self._cached.get(key)
      # keep at least the last context token to prefill: its logits start the new turn
      kept.append(0 if cached is None else min(_common_prefix(cached.tokens, context), len(context) - 1))
    if max(kept) == 0 and n > 1 and s.share_prefix:
      kept = self._share_prefix(keys, contexts)
    batch = tracing.bucket_pow2(n, 1)
    longest_kept = max(kept)
    fresh = [list(context[p:]) for context, p in zip(contexts, kept, strict=True)]
    chunk = tracing.bucket_length(max(len(f) for f in fresh), s.min_prompt_bucket)
    new_len = tracing.bucket_pow2(max(max(limits), 1), s.chunk)
    tokens, mask = s._left_pad(fresh, batch, chunk)
    self.reused_tokens += sum(kept)
    self.prefilled_tokens += sum(len(f) for f in fresh)
    if longest_kept == 0:
      self.close()
      start = 0
      slots = tracing.bucket_length(chunk + new_len, 64)
      cache, logits, position = s._prefill(s.params, tokens, mask, np.zeros(slots, bool))
    else:
      start = tracing.bucket_length(longest_kept, 64)  # the kept prefixes' slots (some empty at the end)
      slots = tracing.bucket_length(start + chunk + new_len, 64)
      cache, logits = self._extend_in_groups(keys, kept, fresh, batch, chunk, start, slots)
      position = jnp.asarray(np.asarray([len(c) for c in contexts] + [0] * (batch - n), np.int32))
    state = s._decode_state(cache, logits, position, limits, batch, new_len, rng)
    pieces = s._run_decode(state, list(range(n)) + [-1] * (batch - n), params, stop_strings, keep_cache=True)
    # What the cache now holds for each conversation: the kept prefix (slots 0...), the fresh tokens (left-
    # padded in slots start ... start + chunk), then the sampled ones from slot start + chunk on.
    self._cached, self._pieces = {}, [piece.cache for piece in pieces]
    for number, piece in enumerate(pieces):
      for j, owner in enumerate(piece.owners):
        p, f = kept[owner], fresh[owner]
        count = int(piece.count[j])
        slot_ids = np.concatenate([np.arange(p), start + chunk - len(f) + np.arange(len(f)),
                                   start + chunk + np.arange(count)]).astype(np.int32)
        self._cached[keys[owner]] = _Cached(list(contexts[owner]) + piece.tokens[j, :count].tolist(), number,
                                            piece.cache_rows[j], slot_ids)
    return s._outputs(pieces, n, stop_strings)

  def _share_prefix(self, keys, contexts) -> list[int]:
    """When every context begins with the same `SHARED_PREFIX_MULTIPLE`-rounded run of tokens (and at least
    one such run), prefills it once at batch 1 and records it as every key's cached start; returns the
    tokens each context now keeps (all zero when there is no such prefix: nothing is done)."""
    s = self.sampler
    p = min(len(c) for c in contexts) - 1  # every row keeps a token to prefill: its logits start the turn
    for context in contexts[1:]:
      p = min(p, _common_prefix(contexts[0], context))
    p = max(p, 0) // SHARED_PREFIX_MULTIPLE * SHARED_PREFIX_MULTIPLE
    if p == 0:
      return [0] * len(contexts)
    chunk = tracing.bucket_length(p, s.min_prompt_bucket)
    tokens, mask = s._left_pad([contexts[0][:p]], 1, chunk)
    cache, _, _ = s._prefill(s.params, tokens, mask, np.zeros(chunk, bool))
    self.close()
    self._pieces = [cache]
    slots = (chunk - p + np.arange(p)).astype(np.int32)
    self._cached = {key: _Cached(list(contexts[0][:p]), 0, 0, slots) for key in keys}
    self.prefilled_tokens += p
    self.shared_prefix_tokens += p
    return [p] * len(contexts)

  def _extend_in_groups(self, keys, kept, fresh, batch, chunk, start, slots):
    """Chunked prefill of each conversation's `fresh` tokens into its kept cache (slots `0 ... start`): the
    cache (`slots` slots) and last logits of all rows (row i = request i), the fresh tokens ending at slot
    `start + chunk` in every row.

    One chunk pads every row to the longest new segment (one 700-token observation makes 16 rows prefill
    700 tokens where most need a ~30-token nudge; a first turn's 291-665-token questions and documents pad to
    768), so the rows are extended in length groups (`_length_groups`) where that saves work. The kept
    prefixes are first repacked into the decode layout; each group then gathers its rows' kept slots, extends
    them with its own chunk (no empty decode slots to attend to) and writes its new keys/values back into its
    rows in place (`Sampler._gather_rows`, `_extend`, `_write_rows`)."""
    s = self.sampler
    groups = _length_groups([len(f) for f in fresh], s.min_prompt_bucket, start)
    one = len(groups) == 1
    cache = self._repack(keys, kept, batch, start, slots, start if one else start + chunk)
    self._pieces = []  # the old caches go once the new one is built
    logits = None
    for rows in groups:
      g_chunk = tracing.bucket_length(max(len(fresh[i]) for i in rows), s.min_prompt_bucket)
      g_batch = batch if one else tracing.bucket_pow2(len(rows), 1)
      tokens, mask = s._left_pad([fresh[i] for i in rows], g_batch, g_chunk)
      positions = np.zeros((g_batch, g_chunk), np.int32)
      for j, i in enumerate(rows):
        positions[j, g_chunk - len(fresh[i]):] = np.arange(kept[i], kept[i] + len(fresh[i]))
      if one:  # every row at once, in place in the decode layout
        return s._extend(s.params, cache, tokens, mask, positions)
      if logits is None:
        logits = jnp.zeros((batch, s.config.vocab_size), jnp.float32)
      ids = np.asarray(list(rows) + [batch] * (g_batch - len(rows)), np.int32)  # `batch`: padding, dropped
      group, group_logits = s._extend(s.params, s._gather_rows(cache, ids, start=start, new=g_chunk), tokens,
                                      mask, positions)
      cache, logits = s._write_rows(cache, logits, group, group_logits, ids, start=start, end=start + chunk)
    return cache, logits

  def _repack(self, keys, kept, batch, prefix_slots, slots, index) -> KVCache:
    """One cache with row i = the first `kept[i]` cached tokens of `keys[i]`, at slots 0 ... kept[i]."""
    source = np.zeros(batch, np.int32)
    rows = np.zeros((batch, prefix_slots), np.int32)
    where = np.zeros((batch, prefix_slots), np.int32)
    keep = np.zeros((batch, prefix_slots), bool)
    for i, (key, p) in enumerate(zip(keys, kept, strict=True)):
      if p:
        cached = self._cached[key]
        source[i] = cached.piece
        rows[i, :] = cached.row
        where[i, :p] = cached.slots[:p]
        keep[i, :p] = True
    return self.sampler._repack(tuple(self._pieces), source, rows, where, keep, np.zeros(slots, bool),
                                jnp.int32(index))
