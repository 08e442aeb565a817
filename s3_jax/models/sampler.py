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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from s3_jax import sharding as sharding_lib
from s3_jax.models.decoder import Decoder, forward, lm_logits, nest_params, prefill


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


def _bucket(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, n - 1).bit_length())


def _length_bucket(n: int, minimum: int) -> int:
  """`n` rounded up to one of four steps per power of two (at most 25% padding, where powers of two pad up
  to 100%: a 700-token prompt runs at 768, not 1024), steps of at least 16, at least `minimum`."""
  if n <= minimum:
    return minimum
  step = max(16, 1 << max(0, (n - 1).bit_length() - 3))
  return -(-n // step) * step


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  greedy: bool, top_k: int, use_top_p: bool) -> jax.Array:
  """Token ids `[b]` from float32 `logits [b, v]`: argmax when `greedy`, else a categorical draw from
  `logits / temperature` restricted to the `top_k` largest and to the smallest set of tokens whose
  probability reaches `top_p` (always keeping the most likely token)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  if use_top_p:
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    kept = jnp.where(before < top_p, ordered, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
  return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


class Sampler:
  """Generates continuations of token-id prompts with a `Decoder`.

  `mesh` + `rules` place the weights for decoding (default `SAMPLING_RULES`: no fsdp on weights).
  """

  def __init__(self, model: Decoder, *, eos_token_ids: Sequence[int] = (), tokenizer: Any = None,
               pad_token_id: int = 0, mesh: Mesh | None = None,
               rules: sharding_lib.Rules = sharding_lib.SAMPLING_RULES, chunk: int = 16,
               min_prompt_bucket: int = 16):
    self.config = model.config
    self.compute_dtype = model.compute_dtype
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
    self.unroll = sharding_lib.unroll_loops(mesh)  # layers unrolled on a CPU mesh (collective order)
    self._axes = nest_params({name: p.get_metadata()["logical_axes"]
                              for name, p in model.named_params().items()})
    self.set_params(model.arrays())
    self.trace_counts = {"prefill": 0, "decode": 0}
    self._prefill = jax.jit(self._prefill_fn)
    self._decode = jax.jit(self._decode_fn, static_argnames=("greedy", "top_k", "use_top_p", "ignore_eos"),
                           donate_argnames=("state",))

  def set_params(self, params: dict[str, Any]) -> None:
    """Samples from `params` (the nested arrays `Decoder.arrays()` returns, e.g. the trainer's latest actor)
    from now on, placed with the sampling rules. Same shapes, so nothing recompiles."""
    if self.mesh is not None:
      def place(axes, x):
        return jax.device_put(x, sharding_lib.param_sharding(x.shape, axes, self.mesh, self.rules))
      params = jax.tree.map(place, self._axes, params, is_leaf=lambda x: isinstance(x, tuple))
    self.params = params

  # -- jitted bodies ---------------------------------------------------------------------------------

  def _prefill_fn(self, params, tokens, mask, slots_like):
    self.trace_counts["prefill"] += 1  # runs at trace time only
    hidden, cache = prefill(self.config, params, tokens, mask, slots_like.shape[0], self.compute_dtype,
                            unroll=self.unroll)
    logits = lm_logits(params, hidden[:, -1])
    next_position = jnp.sum(mask, axis=1).astype(jnp.int32)
    return cache, logits, next_position

  def _decode_fn(self, params, state, temperature, top_p, *, greedy, top_k, use_top_p, ignore_eos):
    self.trace_counts["decode"] += 1
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
                              compute_dtype=self.compute_dtype, unroll=self.unroll)
      return {**s, "rng": rng, "tokens": tokens, "logprobs": logprobs, "count": count, "done": done,
              "eos": s["eos"] | hit_eos, "cache": cache, "logits": lm_logits(params, hidden[:, 0]),
              "position": s["position"] + active.astype(jnp.int32), "step": s["step"] + 1}

    return jax.lax.while_loop(cond, body, state)

  # -- host API -------------------------------------------------------------------------------------

  def fits(self, prompt_length: int, max_new_tokens: int) -> bool:
    """Whether a prompt of this length and `max_new_tokens` fit the model's positions once bucketed."""
    positions = (_length_bucket(prompt_length, self.min_prompt_bucket)
                 + _bucket(max(max_new_tokens, 1), self.chunk))
    return positions <= self.config.max_position_embeddings

  def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(), *,
               max_new_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] = (),
               rng: jax.Array | None = None) -> SampleOutput:
    """Continues each prompt (a list of token ids). `max_new_tokens` overrides `params.max_new_tokens`
    per row. Stop strings need the `tokenizer` given at construction."""
    if not prompts:
      raise ValueError("generate() needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
      raise ValueError("every prompt needs at least one token")
    if stop_strings and self.tokenizer is None:
      raise ValueError("stop_strings need a tokenizer (Sampler(..., tokenizer=...))")
    limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
      raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
    n, longest = len(prompts), max(len(p) for p in prompts)
    batch = _bucket(n, 1)
    prompt_len = _length_bucket(longest, self.min_prompt_bucket)
    new_len = _bucket(max(max(limits), 1), self.chunk)
    if prompt_len + new_len > self.config.max_position_embeddings:
      raise ValueError(f"prompt bucket {prompt_len} + {new_len} new tokens exceed the model's "
                       f"max_position_embeddings={self.config.max_position_embeddings}")
    tokens = np.full((batch, prompt_len), self.pad_token_id, np.int32)
    mask = np.zeros((batch, prompt_len), bool)
    for i, prompt in enumerate(prompts):
      tokens[i, prompt_len - len(prompt):] = prompt
      mask[i, prompt_len - len(prompt):] = True
    mask[n:, -1] = True  # padding rows hold one token so their softmax stays finite; they start done
    max_new = np.zeros(batch, np.int32)
    max_new[:n] = limits

    cache, logits, position = self._prefill(self.params, tokens, mask, np.zeros(prompt_len + new_len, bool))
    state = {
        "cache": cache, "logits": logits, "position": position,
        "rng": rng if rng is not None else jax.random.key(0),
        "tokens": jnp.full((batch, new_len), self.pad_token_id, jnp.int32),
        "logprobs": jnp.zeros((batch, new_len), jnp.float32),
        "count": jnp.zeros(batch, jnp.int32), "max_new": jnp.asarray(max_new),
        "done": jnp.asarray(max_new == 0), "eos": jnp.zeros(batch, bool), "step": jnp.zeros((), jnp.int32),
    }
    greedy = params.temperature == 0
    static = {"greedy": greedy, "top_k": 0 if greedy else max(params.top_k, 0),
              "use_top_p": not greedy and params.top_p < 1, "ignore_eos": params.ignore_eos}
    temperature = jnp.float32(params.temperature if not greedy else 1.0)
    stopped = np.zeros(batch, bool)
    while True:
      state = self._decode(self.params, state, temperature, jnp.float32(params.top_p), **static)
      done = np.asarray(state["done"])
      if stop_strings:
        newly = self._stop_string_rows(np.asarray(state["tokens"]), np.asarray(state["count"]),
                                       ~done[:n] & ~stopped[:n], stop_strings)
        if newly.any():
          stopped[:n] |= newly
          done = done | stopped
          state["done"] = jnp.asarray(done)
      if done.all() or int(state["step"]) >= new_len:
        break
    return self._outputs(state, n, stop_strings)

  def _stop_string_rows(self, tokens, counts, candidates, stop_strings) -> np.ndarray:
    hits = np.zeros(len(candidates), bool)
    for i in np.flatnonzero(candidates):
      hits[i] = self._has_stop(tokens[i, :counts[i]], stop_strings)
    return hits

  def _has_stop(self, ids: Sequence[int], stop_strings: Sequence[str]) -> bool:
    text = self.tokenizer.decode(list(ids))
    return any(s in text for s in stop_strings)

  def _outputs(self, state, n, stop_strings) -> SampleOutput:
    tokens = np.asarray(state["tokens"])
    logprobs = np.asarray(state["logprobs"])
    counts = np.asarray(state["count"])
    eos = np.asarray(state["eos"])
    out = SampleOutput([], [], [])
    for i in range(n):
      ids = tokens[i, :counts[i]].tolist()
      reason = "eos" if eos[i] else "length"
      if stop_strings and self._has_stop(ids, stop_strings):
        # The shortest prefix whose text holds a stop string (containment grows with the prefix).
        low, high = 1, len(ids)
        while low < high:
          mid = (low + high) // 2
          low, high = (low, mid) if self._has_stop(ids[:mid], stop_strings) else (mid + 1, high)
        ids, reason = ids[:low], "stop"
      out.tokens.append(ids)
      out.logprobs.append(logprobs[i, :len(ids)].tolist())
      out.finish_reasons.append(reason)
    return out

