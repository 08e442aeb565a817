"""PPO math against plain NumPy loops written from the formulas (s3_protocol.md §6), on random inputs with
masks."""

import jax.numpy as jnp
import numpy as np
import pytest

from s3_jax.rl import ppo


def _masks(rng, b=5, t=13):
  """Rows shaped like rollouts: prompt (0), then a response (1, with a few 0 holes where obs tokens sit for
  the policy mask), then right padding (0)."""
  response = np.zeros((b, t), np.float32)
  policy = np.zeros((b, t), np.float32)
  for i in range(b):
    start = rng.integers(1, 4)
    end = rng.integers(start + 2, t + 1)
    response[i, start:end] = 1
    policy[i, start:end] = rng.random(end - start) < 0.7
    policy[i, end - 1] = 1
  return response, policy


def _np_gae(r, v, m, gamma, lam):
  b, t = r.shape
  adv = np.zeros((b, t))
  for i in range(b):
    running = 0.0
    for j in reversed(range(t)):
      nxt = v[i, j + 1] * m[i, j + 1] if j + 1 < t else 0.0
      delta = r[i, j] + gamma * nxt - v[i, j]
      running = (delta + gamma * lam * running) * m[i, j]
      adv[i, j] = running
  return adv, (adv + v) * m


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
def test_gae_matches_numpy_loop(gamma, lam):
  rng = np.random.default_rng(0)
  response, _ = _masks(rng)
  r = rng.normal(size=response.shape).astype(np.float32)
  v = rng.normal(size=response.shape).astype(np.float32)
  adv, ret = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(response), gamma, lam)
  ref_adv, ref_ret = _np_gae(r, v, response, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[response == 0] == 0)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
  """γ = λ = 1 (s3): A_t = Σ_{s≥t} r_s - V_t inside the response, a closed form independent of the loop."""
  rng = np.random.default_rng(1)
  response, _ = _masks(rng)
  r = rng.normal(size=response.shape) * response
  v = rng.normal(size=response.shape)
  adv, _ = ppo.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(response), 1.0, 1.0)
  expected = (np.cumsum(r[:, ::-1], axis=1)[:, ::-1] - v) * response
  np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)


def test_masked_whiten_mean_var():
  rng = np.random.default_rng(2)
  response, _ = _masks(rng)
  x = rng.normal(3.0, 2.0, size=response.shape).astype(np.float32)
  vals = x[response == 1]
  ref = (x - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) * response
  np.testing.assert_allclose(ppo.masked_whiten(jnp.asarray(x), jnp.asarray(response)), ref, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(ppo.masked_mean(jnp.asarray(x), jnp.asarray(response)), vals.mean(), rtol=1e-6)


@pytest.mark.parametrize("dual_clip", [0.0, 3.0])
def test_policy_loss_matches_numpy(dual_clip):
  rng = np.random.default_rng(3)
  _, policy = _masks(rng)
  logp = rng.normal(-2, 0.5, size=policy.shape).astype(np.float32)
  old = logp + rng.normal(0, 0.8, size=policy.shape).astype(np.float32)
  adv = rng.normal(size=policy.shape).astype(np.float32) * 3
  row, col = np.argwhere(policy == 1)[0]
  logp[row, col], old[row, col], adv[row, col] = -1.0, -3.0, -1.0  # ratio e² > c = 3 with A < 0
  loss, diag = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(policy),
                               0.2, dual_clip)
  ref = np.zeros_like(logp)
  clipped = np.zeros_like(logp)
  for idx in np.ndindex(*logp.shape):
    ratio = np.exp(logp[idx] - old[idx])
    a = -adv[idx] * ratio
    b = -adv[idx] * min(max(ratio, 0.8), 1.2)
    value = max(a, b)
    if dual_clip and adv[idx] < 0:
      value = min(value, -adv[idx] * dual_clip)
    ref[idx] = value * policy[idx]
    clipped[idx] = b > a
  np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(diag["clipped"]), clipped)
  if dual_clip:  # the dual clip binds somewhere on these inputs, so the two variants differ
    plain, _ = ppo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(policy),
                               0.2)
    assert not np.allclose(plain, loss)


def test_value_loss_matches_numpy():
  rng = np.random.default_rng(4)
  response, _ = _masks(rng)
  v = rng.normal(size=response.shape).astype(np.float32)
  old = v + rng.normal(0, 1.0, size=response.shape).astype(np.float32)
  ret = rng.normal(size=response.shape).astype(np.float32)
  loss, frac = ppo.value_loss(jnp.asarray(v), jnp.asarray(old), jnp.asarray(ret), jnp.asarray(response), 0.5)
  clipped_v = old + np.clip(v - old, -0.5, 0.5)
  ref = 0.5 * np.maximum((v - ret) ** 2, (clipped_v - ret) ** 2) * response
  np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)
  expected = (np.abs(v - old) > 0.5) & ((clipped_v - ret) ** 2 > (v - ret) ** 2)
  assert expected.any()
  np.testing.assert_array_equal(np.asarray(frac), expected.astype(np.float32))


def test_kl_estimators_and_entropy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
  logp = rng.normal(-2, 1, size=(3, 4)).astype(np.float32)
  ref = rng.normal(-2, 1, size=(3, 4)).astype(np.float32)
  d = logp - ref
  np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k1"), d, rtol=1e-6)
  np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k2"), 0.5 * d * d, rtol=1e-6)
  np.testing.assert_allclose(ppo.kl_penalty(logp, ref, "k3"), np.exp(-d) - 1 + d, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(ppo.kl_penalty(logp, ref, "k3")) >= 0)
  with pytest.raises(ValueError, match="kl_estimator"):
    ppo.kl_penalty(logp, ref, "k4")
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  np.testing.assert_allclose(ppo.entropy_from_logits(jnp.asarray(logits)), -(p * np.log(p)).sum(-1),
                             rtol=1e-5)


def test_k1_averages_to_the_true_kl_under_sampling():
  """k1 and k3 are unbiased: their mean over tokens drawn from π approaches KL(π‖π_ref)."""
  rng = np.random.default_rng(6)
  p = np.array([0.5, 0.3, 0.2])
  q = np.array([0.2, 0.5, 0.3])
  draws = rng.choice(3, size=200_000, p=p)
  true_kl = float(np.sum(p * np.log(p / q)))
  for est in ("k1", "k3"):
    mean = float(np.mean(ppo.kl_penalty(jnp.log(p[draws]), jnp.log(q[draws]), est)))
    assert abs(mean - true_kl) < 0.01, (est, mean, true_kl)


def test_grpo_normalises_within_groups():
  rng = np.random.default_rng(7)
  response, policy = _masks(rng, b=6)
  scores = np.zeros_like(response)
  totals = np.array([1.0, 0.0, 2.0, 5.0, 1.0, 3.0])
  for i in range(6):
    scores[i, np.flatnonzero(response[i])[-1]] = totals[i]
  groups = np.array([0, 0, 0, 1, 1, 1])
  adv, _ = ppo.advantages_and_returns("grpo", jnp.asarray(scores), jnp.zeros_like(scores),
                                      jnp.asarray(response), jnp.asarray(policy), jnp.asarray(groups),
                                      gamma=1.0, lam=1.0)
  expected = np.zeros(6)
  for g in (0, 1):
    idx = groups == g
    expected[idx] = (totals[idx] - totals[idx].mean()) / (totals[idx].std(ddof=1) + 1e-6)
  np.testing.assert_allclose(adv, expected[:, None] * policy, rtol=1e-5, atol=1e-6)


def test_reinforce_pp_whitened_reward_to_go():
  rng = np.random.default_rng(8)
  response, policy = _masks(rng)
  r = rng.normal(size=response.shape).astype(np.float32) * response
  adv, ret = ppo.advantages_and_returns("reinforce_pp", jnp.asarray(r), None, jnp.asarray(response),
                                        jnp.asarray(policy), None, gamma=0.9, lam=1.0)
  g = np.zeros_like(r)
  for i in range(r.shape[0]):
    running = 0.0
    for j in reversed(range(r.shape[1])):
      running = (r[i, j] + 0.9 * running) * response[i, j]
      g[i, j] = running
  np.testing.assert_allclose(ret, g, rtol=1e-5, atol=1e-6)
  vals = g[policy == 1]
  np.testing.assert_allclose(adv, (g - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) * policy, rtol=1e-4,
                             atol=1e-5)


def test_explained_variance():
  rng = np.random.default_rng(9)
  response, _ = _masks(rng)
  ret = rng.normal(size=response.shape)
  assert float(ppo.explained_variance(jnp.asarray(ret), jnp.asarray(ret), jnp.asarray(response))) == 1.0
  noisy = ret + rng.normal(size=ret.shape)
  vals = (ret - noisy)[response == 1]
  expected = 1 - vals.var(ddof=1) / ret[response == 1].var(ddof=1)
  ev = ppo.explained_variance(jnp.asarray(noisy), jnp.asarray(ret), jnp.asarray(response))
  np.testing.assert_allclose(ev, expected, rtol=1e-4)

  constant = np.zeros_like(ret)
  undefined = ppo.explained_variance(jnp.asarray(noisy), jnp.asarray(constant), jnp.asarray(response))
  assert np.isnan(float(undefined))


@pytest.mark.parametrize("kl_mode, kl_coef", [("reward", 0.1), ("loss", 0.1), ("reward", 0.0)])
def test_token_rewards_subtract_the_kl_on_policy_tokens_in_reward_mode(kl_mode, kl_coef):
  rng = np.random.default_rng(10)
  response, policy = _masks(rng)
  scores = np.zeros_like(response)
  scores[:, -1] = rng.random(response.shape[0])
  old = rng.normal(-2, 0.5, size=response.shape).astype(np.float32)
  ref = old + rng.normal(0, 0.3, size=response.shape).astype(np.float32)
  rewards, kl = ppo.token_rewards(*map(jnp.asarray, (scores, old, ref, policy)),
                                  kl_coef=kl_coef, kl_estimator="k1", kl_mode=kl_mode)
  np.testing.assert_allclose(kl, (old - ref) * policy, rtol=1e-6, atol=1e-7)
  expected = scores - kl_coef * (old - ref) * policy if kl_mode == "reward" else scores
  np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-7)


def test_loss_norm_is_the_minibatch_or_the_micro_batch_token_count():
  micro = {"policy": jnp.asarray(3.0), "response": jnp.asarray(0.0)}
  whole = {"policy": jnp.asarray(10.0), "response": jnp.asarray(20.0)}
  norm = ppo.loss_norm(micro, whole, loss_agg="token_mean", n_micro=4)
  assert (float(norm["policy"]), float(norm["response"])) == (10.0, 20.0)
  norm = ppo.loss_norm(micro, whole, loss_agg="micro_token_mean", n_micro=4)
  assert (float(norm["policy"]), float(norm["response"])) == (12.0, 4.0)  # an empty mask counts as 1 token
  with pytest.raises(ValueError, match=r"ppo\.loss_agg='seq_mean' must be token_mean or micro_token_mean"):
    ppo.loss_norm(micro, whole, loss_agg="seq_mean", n_micro=4)


@pytest.mark.parametrize("kl_mode", ["reward", "loss"])
def test_actor_and_critic_losses_are_the_formulas_token_means(kl_mode):
  """L_pi = (Σ ℓ·m - c_ent Σ H·m [+ β Σ KL·m]) / n, L_V = Σ ½max(...)·m / n, from NumPy sums."""
  rng = np.random.default_rng(11)
  response, policy = _masks(rng)
  logp = rng.normal(-2, 0.5, size=policy.shape).astype(np.float32)
  old = logp + rng.normal(0, 0.3, size=policy.shape).astype(np.float32)
  ref = logp + rng.normal(0, 0.3, size=policy.shape).astype(np.float32)
  adv = rng.normal(size=policy.shape).astype(np.float32)
  entropy = rng.random(policy.shape).astype(np.float32)
  norm = {"policy": jnp.asarray(7.0), "response": jnp.asarray(9.0)}
  loss, sums = ppo.actor_loss(*map(jnp.asarray, (logp, entropy, old, ref, adv, policy)), norm, clip_ratio=0.2,
                              dual_clip=0.0, entropy_coef=0.01, kl_coef=0.5, kl_estimator="k1",
                              kl_mode=kl_mode)
  ratio = np.exp(logp - old)
  pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2)) * policy
  expected = pg.sum() - 0.01 * (entropy * policy).sum()
  if kl_mode == "loss":
    expected += 0.5 * ((logp - ref) * policy).sum()
    np.testing.assert_allclose(sums["kl_loss"], ((logp - ref) * policy).sum(), rtol=1e-5)
  else:
    assert "kl_loss" not in sums
  np.testing.assert_allclose(loss, expected / 7.0, rtol=1e-5)
  np.testing.assert_allclose(sums["entropy"], (entropy * policy).sum(), rtol=1e-5)
  values = rng.normal(size=policy.shape).astype(np.float32)
  old_values = values + rng.normal(0, 1.0, size=policy.shape).astype(np.float32)
  returns = rng.normal(size=policy.shape).astype(np.float32)
  vloss, vsums = ppo.critic_loss(*map(jnp.asarray, (values, old_values, returns, response)), norm,
                                 value_clip=0.5)
  clipped = old_values + np.clip(values - old_values, -0.5, 0.5)
  vf = 0.5 * np.maximum((values - returns) ** 2, (clipped - returns) ** 2) * response
  np.testing.assert_allclose(vloss, vf.sum() / 9.0, rtol=1e-5)
  np.testing.assert_allclose(vsums["vf_loss"], vf.sum(), rtol=1e-5)


def test_estimators_say_whether_they_need_a_critic():
  assert {k: e.uses_critic for k, e in ppo.ADVANTAGE_ESTIMATORS.items()} == {
      "gae": True, "grpo": False, "reinforce_pp": False}
