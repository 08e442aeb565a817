"""The jitted PPO score/update: sharded equals unsharded, no retrace, and PPO learns a toy task (and fails
with the policy gradient's sign flipped, so the test can fail)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from s3_jax import sharding as sharding_lib
from s3_jax.models import heads
from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import Decoder, ValueModel, init_value_head
from s3_jax.models.sampler import Sampler, SamplingParams
from s3_jax.rl import learner as learner_lib
from s3_jax.rl import ppo as ppo_lib
from s3_jax.rl.settings import PPOSettings

CONFIG = DecoderConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, tie_embeddings=False, max_position_embeddings=64)


def _models(config=CONFIG, seed=0):
  actor = Decoder(config, rngs=nnx.Rngs(seed)).arrays()
  critic = heads.critic_params(ValueModel(config, rngs=nnx.Rngs(seed + 1)))
  return actor, critic


def _random_batch(rng, b=16, t=24, vocab=32, width=21, prompt_lengths=(3, 8), prefix=0):
  """Rows of prompt (3-7 tokens), response (policy and observation tokens), padding; per-token arrays in the
  response window, as `experience.response_window` lays them out. `prefix`: every row begins with the same
  tokens (an instruction template)."""
  tokens = rng.integers(0, vocab, size=(b, t)).astype(np.int32)
  tokens[:, :prefix] = tokens[0, :prefix]
  attention = np.zeros((b, t), bool)
  index = np.zeros((b, width), np.int32)
  policy = np.zeros((b, width), bool)
  response = np.zeros((b, width), bool)
  scores = np.zeros((b, width), np.float32)
  for i in range(b):
    prompt = rng.integers(*prompt_lengths)
    end = rng.integers(prompt + 3, t + 1)
    n = end - prompt
    attention[i, :end] = True
    index[i] = np.minimum(prompt + np.arange(width), t - 1)
    response[i, :n] = True
    policy[i, :n] = rng.random(n) < 0.8
    policy[i, n - 1] = True
    scores[i, n - 1] = rng.choice([0.0, 1.0, 2.0])
  return {"tokens": tokens, "attention_mask": attention, "index": index, "policy_mask": policy,
          "response_mask": response, "token_scores": scores, "group": np.arange(b, dtype=np.int32)}


SETTINGS = PPOSettings(batch_size=16, mini_batch_size=8, actor_micro_batch_size=4,
                                  critic_micro_batch_size=4, score_micro_batch_size=8, actor_lr=1e-3,
                                  critic_lr=1e-3, kl_coef=0.01, critic_warmup_steps=2, epochs=2)


def _run(learner, steps, seed=0):
  """`steps` PPO steps on random batches; the critic is separate or (shared_head) a head on the actor."""
  actor, critic = _models()
  ref = learner.place_ref(actor)
  if learner.shared_head:
    actor["value_head"] = init_value_head(CONFIG, jax.random.key(5))
  state = learner.init_state(actor, critic if learner.separate_critic else None)
  rng = np.random.default_rng(seed)
  all_metrics = []
  for _ in range(steps):
    batch = learner.place_batch(_random_batch(rng))
    scored = learner.score(state, ref, batch)
    state, metrics = learner.update(state, {**batch, **scored})
    all_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), all_metrics


# fp32: reduction order only. bf16: the sharded and unsharded programs round bf16 activations at different
# points (partial sums per shard), so metrics agree to bf16's ~2-3 significant digits.
@pytest.mark.parametrize("separate, compute_dtype", [(True, jnp.float32), (False, jnp.float32),
                                                     (True, jnp.bfloat16)])
def test_sharded_update_matches_unsharded_and_does_not_retrace(separate, compute_dtype):
  assert jax.device_count() == 8
  settings = dataclasses.replace(SETTINGS, separate_critic=separate)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  plain = learner_lib.PPOLearner(settings, CONFIG, compute_dtype=compute_dtype)
  sharded = learner_lib.PPOLearner(settings, CONFIG, mesh=mesh, compute_dtype=compute_dtype)
  fp32 = compute_dtype == jnp.float32
  steps = 3 if fp32 else 1  # bf16: one step's metrics are the check (below); CI time
  state_a, metrics_a = _run(plain, steps)
  state_b, metrics_b = _run(sharded, steps)
  for a, b in zip(metrics_a, metrics_b, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4 if fp32 else 2e-2, atol=2e-5 if fp32 else 2e-3,
                                 err_msg=k)
  if fp32:  # bf16: Adam's steps of near-zero gradients rounded differently differ by up to 2·lr, so the
    # weights after 3 steps say little; the metrics above (losses, KL, gradient norms) are the check
    flat_a = jax.tree_util.tree_leaves_with_path(state_a)
    flat_b = jax.tree.leaves(state_b)
    for (path, a), b in zip(flat_a, flat_b, strict=True):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
  assert sharded.trace_counts == {"score": 1, "update": 1}
  # The weights really are sharded on the 2×2×2 mesh (fsdp on embed, tensor on heads).
  q = sharded.state_shardings["actor"]["params"]["layers"]["q"]
  assert tuple(q.spec)[:3] == (None, "fsdp", "tensor"), q.spec
  if separate and fp32:  # s3's critic warm-up: PPO step s uses lr · min(1, s / 2): 0, 0.5, 1 × lr
    np.testing.assert_allclose([m["critic/lr"] for m in metrics_a], [0.0, 5e-4, 1e-3], rtol=1e-6)


@pytest.mark.parametrize("actor_lr, critic_lr", [(0.0, 1e-3), (1e-3, 0.0)])
def test_a_value_head_on_the_actor_learns_at_the_critic_rate(actor_lr, critic_lr):
  """critic.separate_model=False: the value head takes ppo.critic_lr and the trunk ppo.actor_lr. AdamW's first
  step moves a weight with gradient g by -lr·(g / (|g| + ε) + wd·w): by lr·sign(g), plus decay. A zero kernel
  (critic.head_init=zeros) gives values of exactly 0 before the update."""
  settings = dataclasses.replace(SETTINGS, separate_critic=False, batch_size=16, mini_batch_size=16,
                                 actor_micro_batch_size=8, epochs=1, actor_lr=actor_lr, critic_lr=critic_lr,
                                 critic_warmup_steps=0)
  learner = learner_lib.PPOLearner(settings, CONFIG)
  actor, _ = _models()
  ref = learner.place_ref(actor)
  actor["value_head"] = init_value_head(CONFIG, jax.random.key(5), kernel="zeros")
  before = jax.device_get(actor)
  state = learner.init_state(actor)
  batch = learner.place_batch(_random_batch(np.random.default_rng(1)))
  scored = learner.score(state, ref, batch)
  np.testing.assert_array_equal(jax.device_get(scored["values"]), 0.0)
  state, metrics = learner.update(state, {**batch, **scored})
  after = jax.device_get(state["actor"]["params"])
  assert metrics["actor/lr"] == np.float32(actor_lr) and metrics["critic/lr"] == np.float32(critic_lr)
  wd = settings.weight_decay
  for part, lr in (("value_head", critic_lr), ("trunk", actor_lr)):
    keys = ["value_head"] if part == "value_head" else [k for k in before if k != "value_head"]
    for k in keys:
      for (path, w0), w1 in zip(jax.tree_util.tree_leaves_with_path(before[k]), jax.tree.leaves(after[k]),
                                strict=True):
        w0, w1 = np.asarray(w0, np.float64), np.asarray(w1, np.float64)
        step = np.abs(w1 - w0 * (1 - lr * wd))  # lr·|g| / (|g| + ε), up to float32 rounding of w1
        ulp = 2 * np.finfo(np.float32).eps * np.maximum(np.abs(w0), np.abs(w1))
        name = f"{k}{jax.tree_util.keystr(path)}"
        assert np.all(step <= lr + ulp), name
        if lr:
          assert np.median(step) > 0.99 * lr, name  # every weight with a gradient moved by lr
        else:
          np.testing.assert_array_equal(w1, w0, err_msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_score_matches_a_direct_forward_pass(temperature):
  """Old log-probs at window slot j are log_softmax(logits[index_j - 1] / T)[token at index_j], T the
  rollout's temperature (s3/verl); values are the head on the hidden state before it."""
  learner = learner_lib.PPOLearner(dataclasses.replace(SETTINGS, temperature=temperature), CONFIG)
  actor, critic = _models()
  state = learner.init_state(actor, critic)
  batch = learner.place_batch(_random_batch(np.random.default_rng(3)))
  scored = jax.device_get(learner.score(state, learner.place_ref(actor), batch))
  model = Decoder(CONFIG, rngs=nnx.Rngs(0))
  tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"])
  index, response = np.asarray(batch["index"]), np.asarray(batch["response_mask"])
  for i in range(3):
    n = int(mask[i].sum())
    logits = np.asarray(model(jnp.asarray(tokens[i:i + 1, :n])), np.float64)[0] / temperature
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    slots = np.flatnonzero(response[i])
    expected = logp[index[i, slots] - 1, tokens[i, index[i, slots]]]
    np.testing.assert_allclose(scored["old_logp"][i, slots], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored["ref_logp"][i, slots], expected, rtol=1e-4, atol=1e-4)
    values = np.asarray(ValueModel(CONFIG, rngs=nnx.Rngs(1))(jnp.asarray(tokens[i:i + 1, :n])))[0]
    np.testing.assert_allclose(scored["values"][i, slots], values[index[i, slots] - 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_window_in_logit_chunks_matches_numpy_and_the_whole_windows_gradient(monkeypatch, temperature):
  """The vocabulary projection over the window in chunks (5, 5, 5, 5, 1 of 21 slots, each rematerialised):
  log-probs and entropies as NumPy computes them from the model's logits (divided by the temperature),
  gradients as the whole window's."""
  actor, _ = _models()
  batch = _random_batch(np.random.default_rng(4), b=3)
  tokens, mask, index = (jnp.asarray(batch[k]) for k in ("tokens", "attention_mask", "index"))

  def logprobs(params):
    hidden = heads.hidden_states(CONFIG, params, tokens, mask, jnp.float32)
    return heads.logprobs_from_hidden(params, hidden, tokens, index, True, temperature)

  def loss(params):
    logp, entropy = logprobs(params)
    return jnp.sum(logp * jnp.arange(21.0)) + jnp.sum(entropy)

  whole_grad = jax.grad(loss)(actor)
  monkeypatch.setattr(heads, "LOGITS_CHUNK", 5)
  logp, entropy = (np.asarray(x) for x in logprobs(actor))
  logits = np.asarray(Decoder(CONFIG, rngs=nnx.Rngs(0))(tokens, mask), np.float64) / temperature
  log_softmax = logits - logits.max(-1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
  before = np.asarray(index) - 1
  rows = np.arange(3)[:, None]
  np.testing.assert_allclose(logp, log_softmax[rows, before, np.asarray(tokens)[rows, np.asarray(index)]],
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(entropy, -(np.exp(log_softmax) * log_softmax).sum(-1)[rows, before],
                             rtol=0, atol=1e-5)
  chunked_grad = jax.grad(loss)(actor)
  for a, b in zip(jax.tree.leaves(chunked_grad), jax.tree.leaves(whole_grad), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)  # f32 sums reordered


def test_micro_batch_size_does_not_change_a_token_mean_update():
  """With ppo.loss_agg=token_mean the gradient is one token mean over the minibatch, whatever the micro-batch
  split; s3's micro_token_mean (mean of per-micro means) differs from it."""
  results = {}
  for name, micro, agg in (("a", 2, "token_mean"), ("b", 8, "token_mean"), ("c", 2, "micro_token_mean")):
    settings = dataclasses.replace(SETTINGS, actor_micro_batch_size=micro, critic_micro_batch_size=micro,
                                   loss_agg=agg, epochs=1)
    state, _ = _run(learner_lib.PPOLearner(settings, CONFIG), 1)
    results[name] = state["actor"]["params"]["layers"]["q"]
  np.testing.assert_allclose(results["a"], results["b"], rtol=1e-5, atol=1e-7)
  assert not np.allclose(results["a"], results["c"], rtol=1e-5, atol=1e-7)


def test_settings_take_the_rollout_temperature_for_log_probs():
  from s3_jax import config_lib

  config = config_lib.default_config()
  assert PPOSettings.from_config(config).temperature == 0.6  # s3's rollout temperature
  config.rollout.temperature = 0.0  # greedy rollouts: the model's own distribution
  assert PPOSettings.from_config(config).temperature == 1.0


def test_settings_reject_sizes_that_do_not_divide():
  with pytest.raises(ValueError, match="mini_batch_size"):
    dataclasses.replace(SETTINGS, mini_batch_size=5).check()
  with pytest.raises(ValueError, match="batch shards"):
    dataclasses.replace(SETTINGS, actor_micro_batch_size=2).check(batch_shards=4)
  # configs/tiny.py's sizes (micro-batches 2, 2, 4) on 8 devices: the message names the override that fits
  tiny = dataclasses.replace(SETTINGS, batch_size=8, mini_batch_size=4, actor_micro_batch_size=2,
                             critic_micro_batch_size=2, score_micro_batch_size=4)
  with pytest.raises(ValueError, match=r"data × fsdp = 8\): on these devices pass --config.mesh.data=1 "
                     r"--config.mesh.fsdp=2 \(a mesh over the first 2 device"):
    tiny.check(batch_shards=8)
  tiny.check(batch_shards=2)  # the override's mesh is accepted


# -- the sanity task --------------------------------------------------------------------------------------

TOY = DecoderConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=16, tie_embeddings=False, max_position_embeddings=64)
TARGET = np.arange(4)  # reward: the fraction of response tokens in {0, 1, 2, 3} (random policy: ~0.25)


def _toy_training(steps, flip_sign=False, monkeypatch=None, compute_dtype=jnp.float32):
  if flip_sign:
    original = ppo_lib.policy_loss
    monkeypatch.setattr(ppo_lib, "policy_loss",
                        lambda logp, old, adv, *a, **k: original(logp, old, -adv, *a, **k))
  settings = PPOSettings(batch_size=32, mini_batch_size=16, actor_micro_batch_size=16,
                                    critic_micro_batch_size=16, score_micro_batch_size=32, actor_lr=3e-3,
                                    critic_lr=3e-3, kl_coef=0.0, entropy_coef=0.0, weight_decay=0.0)
  learner = learner_lib.PPOLearner(settings, TOY, compute_dtype=compute_dtype)
  model = Decoder(TOY, rngs=nnx.Rngs(0), compute_dtype=compute_dtype)
  state = learner.init_state(model.arrays(), heads.critic_params(ValueModel(TOY, rngs=nnx.Rngs(1))))
  sampler = Sampler(model, pad_token_id=0)
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  means = []
  for _ in range(steps):
    prompts = rng.integers(4, 16, size=(32, 4))
    key, draw = jax.random.split(key)
    sampler.set_params(state["actor"]["params"])
    out = sampler.generate([list(p) for p in prompts], SamplingParams(temperature=1.0, max_new_tokens=8),
                           rng=draw)
    batch = {"tokens": np.zeros((32, 16), np.int32), "attention_mask": np.zeros((32, 16), bool),
             "index": np.tile(np.arange(4, 12, dtype=np.int32), (32, 1)),
             "policy_mask": np.ones((32, 8), bool), "response_mask": np.ones((32, 8), bool),
             "token_scores": np.zeros((32, 8), np.float32),
             "group": np.arange(32, dtype=np.int32)}
    rewards = []
    for i, (prompt, response) in enumerate(zip(prompts, out.tokens, strict=True)):
      assert len(response) == 8
      batch["tokens"][i, :12] = list(prompt) + response
      batch["attention_mask"][i, :12] = True
      rewards.append(np.isin(response, TARGET).mean())
      batch["token_scores"][i, 7] = rewards[-1]
    means.append(float(np.mean(rewards)))
    placed = learner.place_batch(batch)
    state, _ = learner.update(state, {**placed, **learner.score(state, None, placed)})
  return means


@pytest.mark.parametrize("compute_dtype", [jnp.float32, jnp.bfloat16])
def test_ppo_learns_a_dense_toy_reward(compute_dtype):
  means = _toy_training(30, compute_dtype=compute_dtype)  # bf16: the sampler and the learner compute in bf16
  assert means[0] < 0.4, means[:3]
  assert max(np.mean(means[i:i + 3]) for i in range(len(means) - 2)) >= 0.8, means


def test_flipped_policy_gradient_does_not_learn(monkeypatch):
  means = _toy_training(30, flip_sign=True, monkeypatch=monkeypatch)
  assert max(means) < 0.5, means


def test_check_sharded_names_a_large_replicated_weight():
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  big = np.zeros((1024, 1030), np.float32)  # 1030 columns: not divisible by 8, so a rule would replicate it
  params = {"ok": jax.device_put(np.zeros((1024, 1024), np.float32), sharded),
            "small": jax.device_put(np.zeros(10, np.float32), replicated),
            "bad": jax.device_put(big, replicated)}
  with pytest.raises(ValueError, match=r"\['bad'\] \(1024, 1030\)"):
    sharding_lib.check_sharded(params, mesh)
  del params["bad"]
  sharding_lib.check_sharded(params, mesh)


def test_bfloat16_compute_tracks_float32():
  """fp32 master weights with bf16 compute: the same step, losses within bf16 rounding of fp32's."""
  out = {}
  for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
    learner = learner_lib.PPOLearner(SETTINGS, CONFIG, compute_dtype=dtype)
    state, metrics = _run(learner, 1)
    out[name] = (state, metrics[0])
    assert state["actor"]["params"]["layers"]["q"].dtype == np.float32  # masters stay fp32
  for key in ("actor/entropy", "critic/vf_loss", "critic/value_mean"):
    np.testing.assert_allclose(out["bf16"][1][key], out["fp32"][1][key], rtol=0.05, atol=0.01, err_msg=key)


def test_sampler_copy_in_bfloat16_keeps_shardings_and_the_masters():
  """`rollout.param_dtype=bfloat16`: the sampler's copy of the sharded actor is cast (each array keeps its
  sharding, values equal NumPy's rounding), the master weights stay float32, and None is the identity."""
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  settings = dataclasses.replace(SETTINGS, actor_micro_batch_size=8, critic_micro_batch_size=8)
  learner = learner_lib.PPOLearner(settings, CONFIG, mesh=mesh)
  actor, critic = _models()
  state = learner.init_state(actor, critic)
  masters = heads.policy_params(state["actor"]["params"])
  copy = heads.cast_floats(masters, jnp.bfloat16)
  for (path, master), cast in zip(jax.tree_util.tree_leaves_with_path(masters), jax.tree.leaves(copy),
                                  strict=True):
    assert master.dtype == jnp.float32 and cast.dtype == jnp.bfloat16, jax.tree_util.keystr(path)
    assert cast.sharding == master.sharding, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(cast).astype(np.float32),
                                  np.asarray(master).astype(jnp.bfloat16).astype(np.float32))
  assert heads.cast_floats(masters, None) is masters
  assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(copy))  # the test means something


_COLLECTIVES = ("all-reduce(", "all-gather(", "reduce-scatter(", "all-to-all(", "collective-permute(",
                "all-reduce-start(", "all-gather-start(", "collective-permute-start(")


def _loops_holding_collectives(hlo: str) -> list[str]:
  """The while loops of compiled HLO text whose body or condition (or what they call) holds a collective."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith(" ") and "%" in line:
      name = line.split("%", 1)[1].split(" ", 1)[0]
      bodies[name] = []
    elif line == "}":
      name = None
    elif name is not None:
      bodies[name].append(line)
  called = r"(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)"
  calls = {n: set(re.findall(called, "\n".join(b))) for n, b in bodies.items()}

  def holds(n, seen=()):
    text = "\n".join(bodies.get(n, []))
    return (any(c in text for c in _COLLECTIVES)
            or any(holds(m, (*seen, n)) for m in calls.get(n, ()) - {*seen, n}))

  loops = re.findall(r"(%[\w.\-]+) = .* while\(.*?condition=%([\w.\-]+), body=%([\w.\-]+)", hlo)
  return [loop for loop, cond, body in loops if holds(cond) or holds(body)]


def test_cpu_mesh_programs_hold_no_collective_in_a_loop():
  """XLA:CPU does not order a loop holding collectives against the collectives beside it (devices then run
  them in different orders: gloo aborts, in-process collectives can deadlock), so on a CPU mesh of several
  devices the learner unrolls every loop that would hold one; with the loops kept, the update holds such
  loops (so this check can fail)."""
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding_lib.unroll_loops(mesh) and not sharding_lib.unroll_loops(None)
  assert not sharding_lib.unroll_loops(sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
  settings = dataclasses.replace(SETTINGS, batch_size=8, mini_batch_size=8, score_micro_batch_size=4,
                                 epochs=1)
  learner = learner_lib.PPOLearner(settings, CONFIG, mesh=mesh)
  actor, critic = _models()
  ref = learner.place_ref(actor)
  state = learner.init_state(actor, critic)
  batch = learner.place_batch(_random_batch(np.random.default_rng(0), b=8))
  scored = learner.score(state, ref, batch)
  inputs = {k: batch[k] for k in ("tokens", "attention_mask", "index")}

  def programs():
    score = jax.jit(learner._score_fn).lower(state, ref, inputs).compile().as_text()
    update = jax.jit(learner._update_fn).lower(state, {**batch, **scored}).compile().as_text()
    return _loops_holding_collectives(score), _loops_holding_collectives(update)

  assert programs() == ([], [])
  learner.unroll = False
  assert programs()[1]


def test_fsdp_score_gathers_weights_and_keeps_activations_on_their_rows():
  """On an fsdp mesh each device keeps its rows and all-gathers the weights: the compiled score program holds
  no all-reduce. Without the learner's constraint on the residual stream XLA follows the weights' sharding
  (hidden over fsdp) into the activations and all-reduces them in every layer (so this check can fail)."""
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  settings = dataclasses.replace(SETTINGS, batch_size=8, mini_batch_size=8, actor_micro_batch_size=8,
                                 critic_micro_batch_size=8, score_micro_batch_size=8, epochs=1)

  def collectives(constrained):
    learner = learner_lib.PPOLearner(settings, CONFIG, mesh=mesh)
    if not constrained:
      learner._rows = lambda x: x
    actor, critic = _models()
    ref, state = learner.place_ref(actor), learner.init_state(actor, critic)
    batch = learner.place_batch(_random_batch(np.random.default_rng(0), b=8))
    inputs = {k: batch[k] for k in ("tokens", "attention_mask", "index")}
    hlo = jax.jit(learner._score_fn).lower(state, ref, inputs).compile().as_text()
    return len(re.findall(r" all-reduce\(", hlo)), len(re.findall(r" all-gather\(", hlo))

  reduces, gathers = collectives(True)
  assert reduces == 0 and gathers > 0
  assert collectives(False)[0] > 0


# -- micro-batches padded to their own lengths (ppo.micro_batch_padding=own, rl/layout.py) ----------------

def test_layout_groups_rows_by_length_and_pads_each_micro_batch_to_its_own():
  from s3_jax.rl import layout as layout_lib

  rng = np.random.default_rng(7)
  batch = _random_batch(rng)
  lengths, widths = layout_lib.row_extents(batch)
  np.testing.assert_array_equal(lengths, batch["attention_mask"].sum(1))  # rows are right-padded
  np.testing.assert_array_equal(widths, batch["response_mask"].sum(1))  # the response starts the window
  layout = layout_lib.plan(lengths, widths, SETTINGS, length=24, width=21)
  assert sorted(r for mb in layout.score for r in mb.rows) == list(range(16))
  score_order = [r for mb in layout.score for r in mb.rows]
  assert list(lengths[score_order]) == sorted(lengths, reverse=True)  # similar lengths share a micro-batch
  for mb in [*layout.score, *[m for mini in layout.actor + layout.critic for m in mini]]:
    assert lengths[list(mb.rows)].max() <= mb.length <= 24 and widths[list(mb.rows)].max() <= mb.width <= 21
  assert min(mb.length for mb in layout.score) < 24  # something was cut
  for m, mini in enumerate(layout.actor):  # minibatches keep their rows (s3: m*8 ... m*8+7), regrouped inside
    assert sorted(r for mb in mini for r in mb.rows) == list(range(8 * m, 8 * m + 8))
    assert [len(mb.rows) for mb in mini] == [4, 4]
  # micro_token_mean's loss depends on which rows share a micro-batch: s3's groups (in order), only trimmed.
  s3_groups = layout_lib.plan(lengths, widths, dataclasses.replace(SETTINGS, loss_agg="micro_token_mean"),
                              length=24, width=21)
  assert [mb.rows for mini in s3_groups.actor for mb in mini] == [tuple(range(i, i + 4))
                                                                  for i in (0, 4, 8, 12)]
  assert layout_lib.plan(lengths, widths, dataclasses.replace(SETTINGS, separate_critic=False), length=24,
                         width=21).critic == ()
  with pytest.raises(ValueError, match="do not fit"):
    layout_lib.plan(lengths, widths, SETTINGS, length=16, width=21)
  with pytest.raises(ValueError, match="8 rows"):
    layout_lib.plan(lengths[:8], widths[:8], SETTINGS, length=24, width=21)
  assert learner_lib.PPOLearner(dataclasses.replace(SETTINGS, micro_batch_padding="batch"), CONFIG).layout(
      batch) is None


def _strided(batch, mini, micro):
  """`batch` with each minibatch's rows reordered so that the whole-batch path's strided micro-batches
  (chunk j = rows j, j + n, ... of the minibatch) hold s3's contiguous ones (rows j·micro ... + micro - 1)."""
  n = mini // micro
  within = [(p % n) * micro + p // n for p in range(mini)]
  order = np.concatenate([m + np.asarray(within) for m in range(0, len(batch["tokens"]), mini)])
  return {k: v[order] for k, v in batch.items()}, order


def _run_in_layouts(learner, use_layout, steps=2, s3_micro_batches=False, **batch_kwargs):
  actor, critic = _models()
  ref = learner.place_ref(actor)
  if learner.shared_head:
    actor["value_head"] = init_value_head(CONFIG, jax.random.key(5))
  state = learner.init_state(actor, critic if learner.separate_critic else None)
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    host = _random_batch(rng, **batch_kwargs)
    order = np.arange(len(host["tokens"]))
    if s3_micro_batches:
      host, order = _strided(host, learner.settings.mini_batch_size, learner.settings.actor_micro_batch_size)
    layout = learner.layout(host) if use_layout else None
    batch = learner.place_batch(host)
    scored = learner.score(state, ref, batch, layout)
    state, metrics = learner.update(state, {**batch, **scored}, layout)
    back = np.argsort(order)  # rows in the generated order
    out.append(({k: v[back] for k, v in host.items()},
                {k: v[back] for k, v in jax.device_get(scored).items()}, jax.device_get(metrics)))
  return jax.device_get(state), out


def _assert_same_steps(steps_a, steps_b, state_a, state_b):
  """Two runs' scores over each row's response (slots past it are not scored in a layout, and unused),
  metrics of every step and final states agree (fp32: only the order of float sums differs)."""
  for (host, scored_a, metrics_a), (_, scored_b, metrics_b) in zip(steps_a, steps_b, strict=True):
    response = host["response_mask"]
    for k in ("old_logp", "ref_logp", "values"):
      np.testing.assert_allclose(scored_b[k][response], scored_a[k][response], rtol=1e-5, atol=2e-6,
                                 err_msg=k)
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
      np.testing.assert_allclose(metrics_b[k], metrics_a[k], rtol=2e-5, atol=2e-6, err_msg=k)
  leaves_b = jax.tree.leaves(state_b)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_a), leaves_b, strict=True):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("separate, loss_agg, mesh", [(True, "token_mean", False),
                                                      (False, "token_mean", False),
                                                      (True, "micro_token_mean", False),
                                                      (True, "token_mean", True)])
def test_micro_batches_padded_to_their_own_length_give_the_whole_batchs_update(separate, loss_agg, mesh):
  """Cutting each micro-batch to its own rows' length and regrouping rows by length changes no score, metric
  or weight (fp32: only the order of float sums), sharded or not; every trace is for a new shape. With
  micro_token_mean the layout keeps s3's contiguous micro-batches, which the whole-batch path (strided chunks)
  holds when each minibatch's rows are reordered (`_strided`)."""
  settings = dataclasses.replace(SETTINGS, separate_critic=separate, loss_agg=loss_agg)
  kwargs = {"mesh": sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})} if mesh else {}
  whole = learner_lib.PPOLearner(settings, CONFIG, **kwargs)
  own = learner_lib.PPOLearner(settings, CONFIG, **kwargs)
  state_a, steps_a = _run_in_layouts(whole, False, s3_micro_batches=loss_agg == "micro_token_mean")
  state_b, steps_b = _run_in_layouts(own, True)
  _assert_same_steps(steps_a, steps_b, state_a, state_b)
  assert whole.trace_counts == {"score": 1, "update": 1}
  assert own.trace_counts["score"] >= 2  # micro-batches of different lengths were scored
  assert len(set(own.traces)) == len(own.traces)  # nothing traced twice for one signature


# -- a prefix every row shares, computed once (ppo.shared_prefix) --------------------------------------------

def test_shared_prefix_length_is_common_real_tokens_before_every_window(monkeypatch):
  from s3_jax.rl import layout as layout_lib

  rng = np.random.default_rng(3)
  batch = _random_batch(rng, t=40, width=26, prompt_lengths=(14, 18), prefix=11)
  assert layout_lib.common_prefix_length(batch["tokens"]) >= 11
  common = layout_lib.common_prefix_length(batch["tokens"])
  assert layout_lib.shared_prefix_length(batch, multiple=1) == common
  assert layout_lib.shared_prefix_length(batch, multiple=4) == 8  # rounded down
  assert layout_lib.shared_prefix_length(batch) == 0  # shorter than PREFIX_MULTIPLE (64)
  cut = {**batch, "index": batch["index"].copy()}
  cut["index"][5] -= 10  # a window that starts at 4 or later: its first prediction reads position index - 1
  assert layout_lib.shared_prefix_length(cut, multiple=1) == int(cut["index"][:, 0].min()) - 1
  padded = {**batch, "attention_mask": batch["attention_mask"].copy()}
  padded["attention_mask"][3, :2] = False  # not a real token in every row: not shared
  assert layout_lib.shared_prefix_length(padded, multiple=1) == 0
  assert layout_lib.shared_prefix_length(_random_batch(rng), multiple=1) == 0  # random rows share nothing
  lengths, widths = layout_lib.row_extents(batch)
  with pytest.raises(ValueError, match="shared prefix of 40 tokens"):
    layout_lib.plan(lengths, widths, SETTINGS, length=40, width=26, prefix=40)
  monkeypatch.setattr(layout_lib, "PREFIX_MULTIPLE", 4)
  learner = learner_lib.PPOLearner(dataclasses.replace(SETTINGS, shared_prefix=True), CONFIG)
  assert learner.layout(batch).prefix == 8
  assert learner_lib.PPOLearner(SETTINGS, CONFIG).layout(batch).prefix == 0  # off


@pytest.mark.parametrize("separate, loss_agg, mesh", [pytest.param(True, "token_mean", False,
                                                                   marks=pytest.mark.late(seconds=100)),
                                                      (True, "micro_token_mean", False),
                                                      (False, "token_mean", True)])
def test_a_shared_prefix_computed_once_gives_the_same_scores_and_update(separate, loss_agg, mesh,
                                                                       monkeypatch):
  """Rows that begin with the same 11 tokens: computing their first 8 once per batch (score) and once per
  minibatch (update: its keys/values' gradient summed over micro-batches, pulled back once) changes no score,
  metric or weight against running every row whole (fp32: only the order of float sums)."""
  from s3_jax.rl import layout as layout_lib

  monkeypatch.setattr(layout_lib, "PREFIX_MULTIPLE", 4)
  settings = dataclasses.replace(SETTINGS, separate_critic=separate, loss_agg=loss_agg)
  kwargs = {"mesh": sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})} if mesh else {}
  whole = learner_lib.PPOLearner(settings, CONFIG, **kwargs)
  shared = learner_lib.PPOLearner(dataclasses.replace(settings, shared_prefix=True), CONFIG, **kwargs)
  batch = {"t": 40, "width": 26, "prompt_lengths": (14, 18), "prefix": 11}
  state_a, steps_a = _run_in_layouts(whole, True, **batch)
  state_b, steps_b = _run_in_layouts(shared, True, **batch)
  _assert_same_steps(steps_a, steps_b, state_a, state_b)
  assert any(name == "score_prefix" for name, _ in shared.traces)  # the shared path did run
  assert not any(name == "score_prefix" for name, _ in whole.traces)
  assert len(set(shared.traces)) == len(shared.traces)


def test_a_shared_prefix_without_its_gradient_gives_another_update(monkeypatch):
  """The negative control of the test above: the prefix's keys/values with their gradient cut (so only the
  continuations' part reaches the weights) leave the scores of step 1 equal but not the weights."""
  from s3_jax.rl import layout as layout_lib

  monkeypatch.setattr(layout_lib, "PREFIX_MULTIPLE", 4)
  whole = learner_lib.PPOLearner(SETTINGS, CONFIG)
  cut = learner_lib.PPOLearner(dataclasses.replace(SETTINGS, shared_prefix=True), CONFIG)
  prefix = cut._prefix
  monkeypatch.setattr(cut, "_prefix", lambda *a, **k: jax.lax.stop_gradient(prefix(*a, **k)))
  batch = {"t": 40, "width": 26, "prompt_lengths": (14, 18), "prefix": 11}
  state_a, steps_a = _run_in_layouts(whole, True, steps=1, **batch)
  state_b, steps_b = _run_in_layouts(cut, True, steps=1, **batch)
  response = steps_a[0][0]["response_mask"]
  np.testing.assert_allclose(steps_b[0][1]["old_logp"][response], steps_a[0][1]["old_logp"][response],
                             rtol=1e-5, atol=2e-6)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(state_a["actor"]["params"]),
                                                          jax.tree.leaves(state_b["actor"]["params"]),
                                                          strict=True))
  assert diff > 1e-4
