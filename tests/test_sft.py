"""The format warm start (`python -m s3_jax.sft`): its turns parse as s3's protocol says, its traces come out
of the real episode loop with a real BM25 index, a tiny model learns to reproduce a trace (loss falls, greedy
output equals it), and the trainer loads the saved weights."""

import json

import jax
import numpy as np
import pytest
from conftest import REPO

from s3_jax import config_lib, sft
from s3_jax.models.tokenizer import load_tokenizer
from s3_jax.search import protocol


def _config(*overrides):
  return config_lib.load(str(REPO / "configs/tiny.py"), ["rollout.max_response_length=128", *overrides])


@pytest.mark.parametrize("searches", [0, 1, 2])
def test_turns_parse_as_the_protocol_says_and_never_use_the_answer(searches):
  question = "Which river flows through the city of Vienna?"
  rng = np.random.default_rng(0)
  p = None
  for _ in range(50):  # a plan with this many searches
    p = sft.plan(question, rng, max_searches=2, max_select=3)
    if len(p.queries) == searches:
      break
  assert len(p.queries) == searches
  texts = sft.turn_texts(p)
  assert len(texts) == searches + 1
  assert p.queries[:1] in ((), ("river flows through city Vienna",))
  assert len(set(p.queries)) == len(p.queries)  # a second search asks something else
  for t, text in enumerate(texts):
    action = protocol.parse_action(protocol.cut_response(text))
    if t < searches:
      assert (action.kind, action.query) == ("search", p.queries[t])
    else:
      assert action.kind == "complete"
    if t > 0:
      assert protocol.selected_ids_in(text, 3) == list(range(1, p.selects[t - 1] + 1))
  # the rule takes the question and a seeded generator only: the same seed gives the same plan
  again = [sft.plan(question, np.random.default_rng(7), 2, 3) for _ in range(2)]
  assert again[0] == again[1]


def _traces(asset, n=6, seed=0):
  from s3_jax import assets
  from s3_jax.data.qa import read_qa
  from s3_jax.retrieval.index_dir import ensure_config_index, load_retriever

  config = _config()
  tokenizer = load_tokenizer(asset("smollm2-135m-instruct"))
  retriever = load_retriever(ensure_config_index(config, False))
  examples = read_qa(assets.resolve(config.data.train))[:n]
  traces, plans = sft.make_traces(config, tokenizer, retriever, examples, seed)
  return config, tokenizer, retriever, examples, traces, plans


def test_traces_come_out_of_the_episode_loop_as_planned(asset):
  config, tokenizer, retriever, _, traces, plans = _traces(asset)
  assert {len(p.queries) for p in plans} == {0, 1, 2}  # seed 0 draws all three over 6 questions
  for trace, p in zip(traces, plans, strict=True):
    assert trace.ended == "complete"
    trained = [t for t, m in zip(trace.tokens, trace.loss_mask, strict=True) if m]
    assert trained[-1] == tokenizer.eos_token_id
    # the trained tokens are exactly the scripted turns (the environment's observations are not trained on)
    assert tokenizer.decode(trained[:-1]) == "".join(sft.turn_texts(p))
    text = tokenizer.decode(trace.tokens)
    results = retriever.search(list(p.queries), config.rollout.topk) if p.queries else []
    for query, docs in zip(p.queries, results, strict=True):
      assert docs[0].text[:40] in text  # each search's results were inserted, as the retriever returns them
      assert json.dumps(query) in text


def test_a_tiny_model_learns_a_trace_and_the_trainer_loads_it(asset, tmp_path):
  import jax.numpy as jnp
  from flax import nnx

  from s3_jax import train
  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import save_hf_params
  from s3_jax.models.sampler import Sampler, SamplingParams
  from s3_jax.models.searcher import decoder_config
  from s3_jax.rl.settings import PPOSettings

  config, tokenizer, _, _, traces, plans = _traces(asset, n=3)
  trace, p = next((t, p) for t, p in zip(traces, plans, strict=True) if len(p.queries) == 1)
  model = Decoder(decoder_config(config, tokenizer), rngs=nnx.Rngs(0))
  params, losses = sft.train(model.config, model.arrays(), [trace] * 2, epochs=100, lr=3e-3, micro=2, seed=0,
                             log=lambda _: None)
  assert losses[-1] < 0.05 * losses[0], losses[::5]
  # greedy from the prompt: the first scripted turn (the query), stopping at </query> as a rollout does
  prompt = trace.tokens[:trace.loss_mask.index(True)]
  model_state = nnx.eval_shape(lambda: Decoder(model.config, rngs=nnx.Rngs(0)))
  for name, param in model_state.named_params().items():
    param.set_value(params["layers"][name[len("layers."):]] if name.startswith("layers.") else params[name])
  sampler = Sampler(model_state, tokenizer=tokenizer)
  out = sampler.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=64),
                         stop_strings=("</query>",)).tokens[0]
  assert tokenizer.decode(out) == sft.turn_texts(p)[0]
  # saved as an HF folder, it is what the trainer starts from
  save_hf_params(params, model.config, tmp_path / "sft", tokenizer)
  config = _config(f"searcher.init_from={tmp_path / 'sft'}")
  actor, _ = train._init_models(config, PPOSettings.from_config(config), tokenizer)
  for a, b in zip(jax.tree.leaves(actor.arrays()), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b, dtype=jnp.float32))


@pytest.mark.entry
def test_cli_writes_a_model_folder_and_its_record(tmp_path):
  import subprocess
  import sys

  done = subprocess.run([sys.executable, "-m", "s3_jax.sft", "--config", "configs/tiny.py", "--out",
                         str(tmp_path / "sft"), "--questions", "4", "--epochs", "1", "--micro", "2",
                         "--config.rollout.max_response_length=128"],
                        capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads((tmp_path / "sft" / "sft.json").read_text())
  assert record["questions"] == 4 and len(record["losses"]) == 2 and len(record["searches"]) == 4
  assert (tmp_path / "sft" / "model.safetensors").is_file() or list((tmp_path / "sft").glob("*.safetensors"))
  bad = subprocess.run([sys.executable, "-m", "s3_jax.sft", "--config", "configs/tiny.py", "--out",
                        str(tmp_path / "x"), "--questions", "0"], capture_output=True, text=True, cwd=REPO)
  assert bad.returncode != 0 and "--questions 0" in bad.stderr
