"""`python -m s3_jax.evaluate` end to end on the tiny world: every method with the real BM25 retriever and the
real SmolLM2 generator behind gRPC on loopback; the reports recomputed here from predictions.jsonl; resuming;
MIRAGE judge-only scoring; a searcher checkpoint; the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import FIXTURES, REPO

from s3_jax import config_lib
from s3_jax.evaluate import METHODS, compare, evaluate
from s3_jax.models import precision
from s3_jax.reward.answers import exact_match, f1, span_match
from s3_jax.search.formats import generator_context

OVERRIDES = ["evaluate.sample=2", "evaluate.agent_max_tokens=24", "evaluate.max_searches=2",
             f"evaluate.flashrag_dir={FIXTURES / 'flashrag'}",
             f"evaluate.mirage_file={FIXTURES / 'mirage' / 'benchmark.json'}"]


# The configured generator's name: the default `generator.compute_dtype=auto` computes in bf16 on hardware
# with bf16 units, a generator of its own in tables and caches (`@bfloat16`).
GENERATOR = "jax:asset:smollm2-135m-instruct" + (
    "@bfloat16" if precision.resolve("auto") == "bfloat16" else "")


def _config(*extra):
  return config_lib.load(str(REPO / "configs/tiny.py"), [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def services(asset):
  from s3_jax.services.connect import open_services

  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-fanout"):
    asset(name)
  with open_services(_config(), show_progress=False, log=lambda *_: None) as running:
    yield running


def _rows(out):
  return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def _check_reports(out, runs=1):
  """summary.json and table.md against a recomputation from predictions.jsonl, and every row's scores
  against the answer checks."""
  rows = _rows(out)
  summary = json.loads((out / "summary.json").read_text())
  table = (out / "table.md").read_text()
  assert (out / "genacc.png").stat().st_size > 1000
  keys = [(r["data_source"], r["id"], r["run"]) for r in rows]
  assert len(keys) == len(set(keys))
  for r in rows:
    s = r["scores"]
    assert s["span"] == span_match(r["answer"], r["golden_answers"])
    assert s["em"] == exact_match(r["answer"], r["golden_answers"])
    assert s["f1"] == pytest.approx(f1(r["answer"], r["golden_answers"]))
    assert s["genacc"] == ((s["judge"] is True) if r["data_source"] in ("medqa", "pubmedqa")
                           else s["span"] or s["judge"] is True)
  sources = sorted({r["data_source"] for r in rows})
  assert sorted(k for k in summary if k != "average") == sources
  per_source_runs = {}
  for source in sources:
    mine = [r for r in rows if r["data_source"] == source]
    assert {r["run"] for r in mine} == set(range(runs))
    means = {m: [np.mean([float(r["scores"][m]) for r in mine if r["run"] == k]) for k in range(runs)]
             for m in ("genacc", "em", "span", "f1")}
    means["context_docs"] = [np.mean([r["context_docs"] for r in mine if r["run"] == k]) for k in range(runs)]
    per_source_runs[source] = means
    for metric, values in means.items():
      assert summary[source][metric] == pytest.approx(np.mean(values), abs=1e-12)
      if runs > 1:
        assert summary[source][f"{metric}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert summary[source]["questions"] == len(mine) // runs and summary[source]["runs"] == runs
    cell = f"{100 * np.mean(means['genacc']):.1f}"
    row = next(line for line in table.splitlines() if line.startswith(f"| {source} |"))
    assert f"| {cell}" in row and f"| {100 * np.mean(means['em']):.1f} |" in row
  for metric in ("genacc", "em"):
    average = np.mean([np.mean([per_source_runs[s][metric][k] for s in sources]) for k in range(runs)])
    assert summary["average"][metric] == pytest.approx(average, abs=1e-12)
  header = table.splitlines()[4]
  assert header == "| Method | " + " | ".join(sources) + " | Avg | Generator | Judge |"
  # Who answered and who judged, in every row and in the table.
  assert len({(r["generator"], r["judge"]) for r in rows}) == 1
  assert rows[0]["generator"] == GENERATOR
  assert table.splitlines()[6].endswith(f"| {rows[0]['generator']} | {rows[0]['judge']} |")
  return rows, summary


def _s3_rag_context(docs, k=3):
  """s3's naive-RAG context (s3_protocol.md §3.3): e5_retrieval's one line per doc, `Doc {i} (Title: {first
  line of contents}) {rest}\\n` (the title keeps the corpus' quotes), cut before "Doc {k+1}"."""
  return "".join(f'Doc {i} (Title: "{d.title}") {d.text}\n' for i, d in enumerate(docs, start=1)
                 ).split(f"Doc {k + 1}")[0]


@pytest.mark.slow
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.late(seconds=120)) if m == "ircot"
                                    else m for m in METHODS])
def test_every_method_end_to_end(method, services, tmp_path):
  out = tmp_path / method
  evaluate(_config(), method, out, datasets="fanout,nq", services=services, show_progress=False,
           log=lambda *_: None)
  rows, _ = _check_reports(out)
  assert len(rows) == 4 and {r["method"] for r in rows} == {method}
  timing = json.loads((out / "timing.json").read_text())
  assert timing["questions"] == 4 and timing["questions_per_second"] > 0
  assert json.loads((out / "run.json").read_text())["method"] == method
  for r in rows:
    if method == "none":
      assert r["context"] == "" and r["context_docs"] == 0
    if method == "rag":  # the question's top 3, exactly as the retriever returns them, in s3's RAG format
      [docs] = services.retriever.search([r["question"]], 12)
      assert r["context"] == _s3_rag_context(docs) and r["context_docs"] == 3
    if method in ("s3", "ircot", "rag"):
      assert r["context_docs"] >= 1 and r["context_tokens"] > 0


@pytest.mark.slow
def test_runs_resume_and_guards(services, tmp_path, monkeypatch):
  from s3_jax.methods.static import NaiveRAG

  out = tmp_path / "rag"
  calls, original = [], NaiveRAG.run

  def failing(self, examples, seed=0):
    calls.append(len(examples))
    if len(calls) == 3:
      raise RuntimeError("simulated crash")
    return original(self, examples, seed)

  monkeypatch.setattr(NaiveRAG, "run", failing)
  config = _config("evaluate.batch_size=1")
  with pytest.raises(RuntimeError, match="simulated crash"):
    evaluate(config, "rag", out, datasets="nq", runs=2, services=services, show_progress=False,
             log=lambda *_: None)
  assert len(_rows(out)) == 2  # the two finished chunks were kept
  monkeypatch.setattr(NaiveRAG, "run", original)
  logs = []
  evaluate(config, "rag", out, datasets="nq", runs=2, services=services, show_progress=False, log=logs.append)
  assert "2 of 4 predictions already done" in logs[0]
  rows, summary = _check_reports(out, runs=2)
  assert len(rows) == 4 and summary["nq"]["genacc_std"] == 0.0  # greedy answers: both runs agree

  # keys an evaluation never reads (training's, the retry budget) may change between resumed runs
  logs = []
  evaluate(_config("evaluate.batch_size=1", "ppo.actor_lr=3e-6", "services.retry_seconds=5"), "rag", out,
           datasets="nq", runs=2, services=services, show_progress=False, log=logs.append)
  assert "4 of 4 predictions already done" in logs[0]
  # a key the config no longer defines (retired since the record was written) is not a difference
  record = json.loads((out / "run.json").read_text())
  record["config"]["rollout"]["max_start_length"] = 2000
  (out / "run.json").write_text(json.dumps(record))
  logs = []
  evaluate(config, "rag", out, datasets="nq", runs=2, services=services, show_progress=False, log=logs.append)
  assert "4 of 4 predictions already done" in logs[0]
  with pytest.raises(ValueError, match=r"different config.*evaluate\.rag_topk: 3 -> 5"):
    evaluate(_config("evaluate.rag_topk=5"), "rag", out, datasets="nq", services=services,
             show_progress=False, log=lambda *_: None)
  with pytest.raises(ValueError, match="holds an evaluation of --method rag"):
    evaluate(config, "none", out, datasets="nq", services=services, show_progress=False, log=lambda *_: None)
  with pytest.raises(ValueError, match="has no model of its own"):
    evaluate(config, "rag", tmp_path / "x", checkpoint="somewhere", services=services)


@pytest.mark.slow
@pytest.mark.late(seconds=70)
def test_mirage_judge_only(services, tmp_path):
  out = tmp_path / "mirage"
  with pytest.raises(ValueError, match="judge alone"):
    evaluate(_config(), "rag", out, datasets="medqa", services=services)
  evaluate(_config("reward.use_judge=True"), "rag", out, datasets="medqa,pubmedqa", services=services,
           show_progress=False, log=lambda *_: None)
  rows, summary = _check_reports(out)
  assert len(rows) == 3 and all(r["scores"]["judge"] is not None for r in rows)
  assert rows[0]["judge"] == f"{GENERATOR} (the generator)"
  assert summary["medqa"]["judge_asked"] == 1.0
  medqa = [r for r in rows if r["data_source"] == "medqa"]
  assert medqa[0]["golden_answers"] == ["C: Vitamin C"]
  assert "\nOptions:\nA: Vitamin A\n" in medqa[0]["question"]
  [docs] = services.retriever.search(["Which vitamin deficiency causes scurvy"], 12)  # options not searched
  assert medqa[0]["context"] == _s3_rag_context(docs)
  d_s3 = tmp_path / "d_s3"
  evaluate(_config("reward.use_judge=True", "reward.rag_context_format=d_s3"), "rag", d_s3, datasets="medqa",
           services=services, show_progress=False, log=lambda *_: None)
  assert _rows(d_s3)[0]["context"] == generator_context(docs[:3])


@pytest.mark.slow
def test_s3_checkpoint_equals_its_source(services, tmp_path):
  from s3_jax.models.hf import save_hf
  from s3_jax.models.searcher import load_searcher, resolve_checkpoint

  config = _config("evaluate.sample=1")
  model, tokenizer, _ = load_searcher(config, None)  # the tiny config's random searcher
  save_hf(model, tmp_path / "run" / "hf" / "step_3", tokenizer)
  save_hf(model, tmp_path / "run" / "hf" / "step_12", tokenizer)
  (tmp_path / "run" / "config.json").write_text('{"seed": 0}')  # a training workdir's config record
  folder, description = resolve_checkpoint(str(tmp_path / "run"))
  assert folder.name == "step_12" and description.endswith("(step 12)")  # numeric, not lexical, order
  (tmp_path / "bare" / "checkpoints").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="without HF exports"):
    resolve_checkpoint(str(tmp_path / "bare"))

  fresh, loaded = tmp_path / "fresh", tmp_path / "loaded"
  for out, checkpoint in ((fresh, None), (loaded, str(tmp_path / "run"))):
    evaluate(config, "s3", out, checkpoint=checkpoint, datasets="nq", services=services, show_progress=False,
             log=lambda *_: None)
  drop = ("trace",)
  assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(fresh)] == \
      [{k: v for k, v in r.items() if k not in drop} for r in _rows(loaded)]
  assert [r["trace"]["responses"] for r in _rows(fresh)] == [r["trace"]["responses"] for r in _rows(loaded)]
  assert "step 12" in json.loads((loaded / "run.json").read_text())["label"]

  table = compare([fresh, loaded], tmp_path / "both").read_text()
  assert len([x for x in table.splitlines() if x.startswith("| s3 3-2-1 (")]) == 2


@pytest.mark.entry
def test_cli(tmp_path):
  args = [sys.executable, "-m", "s3_jax.evaluate", "--config", str(REPO / "configs/tiny.py"),
          f"--config.evaluate.flashrag_dir={FIXTURES / 'flashrag'}", "--config.evaluate.sample=2"]
  done = subprocess.run([*args, "--method", "none", "--datasets", "nq", "--out", str(tmp_path / "none")],
                        capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| Direct (no retrieval) |" in done.stdout and (tmp_path / "none" / "summary.json").is_file()
  bad = subprocess.run([*args, "--method", "none", "--datasets", "musique", "--out", str(tmp_path / "bad")],
                       capture_output=True, text=True, cwd=REPO)
  assert bad.returncode != 0 and "FlashRAG set 'musique'" in bad.stderr
  table = subprocess.run([sys.executable, "-m", "s3_jax.evaluate", "--compare", str(tmp_path / "none"),
                          "--out", str(tmp_path / "table")], capture_output=True, text=True, cwd=REPO)
  assert table.returncode == 0 and "| Direct (no retrieval) |" in table.stdout


@pytest.mark.slow
def test_generator_backend_is_a_config_change(services, tmp_path, asset, monkeypatch):
  """The same evaluation with the generator behind an OpenAI-compatible endpoint (`generator.backend=openai`,
  as for vLLM's server or a hosted model) gives the answers of the embedded jax backend."""
  from s3_jax.services.generator_backends import JaxBackend
  from s3_jax.services.generator_server import GeneratorService
  from s3_jax.services.http_chat import serve_openai_http

  service = GeneratorService(JaxBackend(str(asset("smollm2-135m-instruct"))), default_max_tokens=16)
  server, port = serve_openai_http(service, token="k3y")
  monkeypatch.setenv("S3_JAX_TEST_KEY", "k3y")
  try:
    evaluate(_config(), "none", tmp_path / "jax", datasets="nq", services=services, show_progress=False,
             log=lambda *_: None)
    evaluate(_config("generator.backend=openai", f"generator.base_url=http://127.0.0.1:{port}/v1",
                     "generator.key_env=S3_JAX_TEST_KEY"), "none", tmp_path / "openai", datasets="nq",
             show_progress=False, log=lambda *_: None)
  finally:
    server.shutdown()
  assert [r["answer"] for r in _rows(tmp_path / "jax")] == [r["answer"] for r in _rows(tmp_path / "openai")]
  with pytest.raises(ValueError, match=r"needs config\.generator\.base_url"):
    evaluate(_config("generator.backend=openai"), "none", tmp_path / "nourl", datasets="nq",
             show_progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_a_judge_of_its_own(services, tmp_path, asset, monkeypatch):
  """`evaluate.judge` names a judge other than the generator (here SmolLM2 behind an OpenAI-compatible
  endpoint, as a hosted Claude would be): the judge's verdicts are its own, its name is in every row, the
  table and the answer cache key, and an unclear verdict is asked again of the generator (s3's rule)."""
  from s3_jax.reward.judge import judge_messages, parse_judge_reply
  from s3_jax.services.generator_backends import JaxBackend
  from s3_jax.services.generator_server import GeneratorService
  from s3_jax.services.http_chat import serve_openai_http

  class Counting(JaxBackend):
    calls = 0

    def generate(self, chats, params):
      Counting.calls += len(chats)
      return super().generate(chats, params)

  backend = Counting(str(asset("smollm2-135m-instruct")))
  server, port = serve_openai_http(GeneratorService(backend, default_max_tokens=16), token="k3y")
  monkeypatch.setenv("S3_JAX_TEST_KEY", "k3y")
  judged = ["reward.use_judge=True", "evaluate.judge.backend=openai", "evaluate.judge.model=haiku-stand-in",
            f"evaluate.judge.base_url=http://127.0.0.1:{port}/v1", "evaluate.judge.key_env=S3_JAX_TEST_KEY"]
  try:
    evaluate(_config(*judged), "rag", tmp_path / "judged", datasets="nq", services=services,
             show_progress=False, log=lambda *_: None)
  finally:
    server.shutdown()
  rows = _rows(tmp_path / "judged")
  asked = [r for r in rows if r["scores"]["judge"] is not None]
  assert Counting.calls >= len(asked) > 0  # the endpoint judged (the generator's own service did not)
  name = f"openai:haiku-stand-in at http://127.0.0.1:{port}/v1; unclear verdicts asked again of {GENERATOR}"
  assert {r["judge"] for r in rows} == {name}
  assert (tmp_path / "judged" / "table.md").read_text().splitlines()[6].endswith(f"| {name} |")
  # Each verdict is the endpoint model's own reply to s3's judge prompt (an unclear one goes to the generator,
  # here the same model, which is unclear again: incorrect).
  for r in asked:
    [reply] = backend.generate([judge_messages(r["answer"], r["golden_answers"])], _judge_params())
    assert r["scores"]["judge"] is bool(parse_judge_reply(reply.text))
  with pytest.raises(ValueError, match=r"config\.evaluate\.judge\.model=''"):
    _config("evaluate.judge.backend=jax")


def _judge_params():
  from s3_jax.services.generator_backends import GenerationParams

  return GenerationParams(temperature=0.0, top_p=1.0, max_tokens=10)


# Qwen2.5's chat template without its tool branches: a default system message when there is none.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.slow
def test_released_checkpoint_layout_samples_from_s3s_exact_prompt(services, tmp_path, asset, monkeypatch):
  """A tiny random Qwen2 saved as `pat-jj/s3-8-3-3-20steps` is laid out (sharded safetensors with an index,
  Qwen2.5's chat template) runs through `evaluate --method s3` on the `faithful` config, and the prompt ids it
  samples from are the chat template applied to s3's exact text (written out in test_protocol.py)."""
  import torch
  import transformers
  from test_protocol import S3_BM25_NOTE, S3_EXAMPLE, S3_INSTRUCTIONS

  from s3_jax.search import episode

  tokenizer = transformers.AutoTokenizer.from_pretrained(asset("smollm2-135m-instruct"))
  tokenizer.chat_template = QWEN25_CHAT_TEMPLATE
  torch.manual_seed(0)
  qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
  folder = tmp_path / "s3-8-3-3-20steps"
  qwen.save_pretrained(folder, max_shard_size="4MB", safe_serialization=True)
  tokenizer.save_pretrained(folder)
  assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()

  seen, sample = [], episode.SamplerPolicy.sample

  def spy(self, contexts, max_new_tokens, keys=None):
    seen.append([list(c) for c in contexts])
    return sample(self, contexts, max_new_tokens, keys)

  monkeypatch.setattr(episode.SamplerPolicy, "sample", spy)
  config = config_lib.load(f"{REPO / 'configs/tiny.py'}:bm25,faithful", [*OVERRIDES, "evaluate.sample=1"])
  assert config.rollout.doc_extraction == "faithful" and config.evaluate.initial_docs == 3
  evaluate(config, "s3", tmp_path / "s3", checkpoint=str(folder), datasets="nq", services=services,
           show_progress=False, log=lambda *_: None)
  [row] = _rows(tmp_path / "s3")
  [initial] = services.retriever.search([row["question"]], 3)
  block = "".join(f'Doc {i} (Title: "{d.title}") {d.text}\n' for i, d in enumerate(initial, start=1))
  s3_text = (S3_INSTRUCTIONS + S3_BM25_NOTE + S3_EXAMPLE + f"\n<question>\n{row['question']}\n</question>\n"
             f"<information>\n{block.strip()}\n</information>\n")
  # The checkpoint's tokenizer as transformers loads the folder (as verl and vLLM do): with the Qwen2 config
  # beside it, it is a Qwen2 tokenizer, whose pre-tokenizer keeps "\\n\\n" as one token.
  reference = transformers.AutoTokenizer.from_pretrained(folder)
  expected = reference.apply_chat_template([{"role": "user", "content": s3_text}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)
  expected = list(expected["input_ids"])
  assert reference.decode(expected).startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
  assert seen[0][0] == expected
