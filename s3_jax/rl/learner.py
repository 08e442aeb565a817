"""The PPO learner: a jitted `score` and a jitted, donated `update` over a plain state pytree.

    score(state, ref_params, batch)  -> old log-probs, reference log-probs, values   (micro-batched)
    update(state, batch)             -> new state, metrics
        token rewards and advantages/returns (`ppo.py`: the recipe, by ppo.adv_estimator)
        epochs × minibatches; per minibatch and learner: micro-batch gradient accumulation, global-norm
        clipping, AdamW with linear warm-up (`optimizer.py`).

Learners: the actor (`ppo.actor_loss`) and, with a critic, either a separate critic network (s3's choice:
backbone + scalar head, its own optimizer) or a value head on the actor's backbone
(`critic.separate_model=False`: actor loss + ppo.vf_coef · `ppo.critic_loss`, one gradient clip; the head
learns at ppo.critic_lr, the trunk at ppo.actor_lr). The heads are `models/heads.py`'s; where arrays live is
`sharding.Placement`'s; the settings are `settings.PPOSettings`.

A batch holds whole sequences (`tokens`, `attention_mask`: `[b, t]`) and a per-row window of the positions
that are trained on (`index [b, w]`, the response after the prompt); every per-token quantity (masks, token
scores, log-probs, values, advantages) is `[b, w]` in window coordinates, slot j meaning the token at
`index[:, j]`.
Shapes are fixed by the batch (bucketed by the caller, or micro-batches padded to their own lengths by a
`layout.Layout`), so nothing retraces for a repeated shape; `trace_counts` counts traces.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from s3_jax import sharding as sharding_lib
from s3_jax import tracing
from s3_jax.models import heads
from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import prefix_kv
from s3_jax.rl import layout as layout_lib
from s3_jax.rl import optimizer as optimizer_lib
from s3_jax.rl import ppo as ppo_lib
from s3_jax.rl.settings import PPOSettings

Params = dict[str, Any]
BATCH_KEYS = ("tokens", "attention_mask", "index", "policy_mask", "response_mask", "token_scores", "group")


class PPOLearner:
  """Holds the static settings, shardings and jitted functions; the state is a plain pytree

      {"actor": {"params", "opt"}, "critic": {"params", "opt"} (separate critic only)}

  `mesh=None` runs unsharded. Batches are dicts of `BATCH_KEYS`: sequences `[b, t]`, the response window
  `index` and per-token arrays `[b, w]`, and `group [b]`.
  """

  def __init__(self, settings: PPOSettings, config: DecoderConfig, *, compute_dtype: Any = jnp.float32,
               mesh: Mesh | None = None, rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES,
               remat: str = "full"):
    self.settings, self.config, self.compute_dtype, self.mesh = settings, config, compute_dtype, mesh
    self.remat = remat  # searcher.remat: per-layer gradient checkpointing in the update (s3: on for both)
    self.unroll = sharding_lib.unroll_loops(mesh)  # every scan unrolled on a CPU mesh (collective order)
    self.placement = sharding_lib.Placement(mesh, rules)
    self.batch_shards = self.placement.batch_shards
    settings.check(self.batch_shards)
    self.with_critic = settings.uses_critic
    self.separate_critic = self.with_critic and settings.separate_critic
    self.shared_head = self.with_critic and not settings.separate_critic
    steps = settings.updates_per_step
    self.actor_lr = optimizer_lib.lr_schedule(settings.actor_lr, settings.actor_warmup_steps, steps)
    self.critic_lr = optimizer_lib.lr_schedule(settings.critic_lr, settings.critic_warmup_steps, steps)
    self.actor_opt = optimizer_lib.make_optimizer(self.actor_lr, settings.weight_decay, settings.grad_clip,
                                    head_schedule=self.critic_lr if self.shared_head else None)
    self.critic_opt = optimizer_lib.make_optimizer(self.critic_lr, settings.weight_decay, settings.grad_clip)
    self.state_shardings = None  # set by init_state on a mesh
    self.trace_counts = {"score": 0, "update": 0}
    self.traces: list[tuple[str, str]] = []  # (function, `tracing.signature`) of every trace, in order
    self._score = None
    self._update = None
    self._jitted: dict[str, Any] = {}

  # -- placement (sharding.Placement) ------------------------------------------------------------------

  def actor_axes(self) -> Params:
    return heads.actor_logical_axes(self.config, self.shared_head)

  def init_state(self, actor: Params, critic: Params | None = None) -> dict[str, Any]:
    """Places the parameters with their shardings and creates the optimizer states (sharded like them).
    `actor` must carry a `value_head` when the critic is a shared head; `critic` is `{"backbone",
    "value_head"}` for a separate critic."""
    if self.shared_head and "value_head" not in actor:
      raise ValueError("critic.separate_model=False needs actor['value_head'] (decoder.init_value_head)")
    if self.separate_critic and critic is None:
      raise ValueError("a separate critic (critic.separate_model=True) needs critic parameters")
    state = {"actor": self._learner_state(actor, self.actor_axes(), self.actor_opt)}
    if self.separate_critic:
      state["critic"] = self._learner_state(critic, heads.critic_logical_axes(self.config), self.critic_opt)
    if self.mesh is not None:
      sharding_lib.check_sharded(state["actor"]["params"], self.mesh)
    self.state_shardings = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, state)
    return state

  def _learner_state(self, params: Params, axes: Params, opt: optax.GradientTransformation):
    shardings = self.placement.params(params, axes)
    params = self.placement.copy(params, shardings)
    if shardings is None:
      return {"params": params, "opt": opt.init(params)}
    opt_shapes = jax.eval_shape(opt.init, params)
    opt_shardings = optax.tree_map_params(opt, lambda _, s: s, opt_shapes, shardings,
                                          transform_non_params=lambda _: self.placement.replicated())
    return {"params": params, "opt": jax.jit(opt.init, out_shardings=opt_shardings)(params)}

  def place_ref(self, ref: Params) -> Params:
    return self.placement.copy(ref, self.placement.params(ref, heads.actor_logical_axes(self.config, False)))

  def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays -> device arrays sharded on the batch dimension (each process gives its own rows)."""
    return self.placement.put_batch(batch)

  def _rows(self, x: jax.Array) -> jax.Array:
    """Activations `[b, ...]` sharded on their rows over the batch axes (a layer's output, between layers)."""
    return self.placement.constrain_rows(x, 0)

  def _split(self, tree: dict[str, jax.Array], size: int) -> dict[str, jax.Array]:
    """`[b, ...]` -> `[b // size, size, ...]`, row i*n + j in chunk j (strided, so each chunk keeps an
    even share of every device's rows and needs no communication)."""
    def split(x):
      n = x.shape[0] // size
      return self.placement.constrain_rows(x.reshape(size, n, *x.shape[1:]).swapaxes(0, 1), 1)
    return jax.tree.map(split, tree)

  @staticmethod
  def _merge(x: jax.Array) -> jax.Array:
    """Inverse of `_split`."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

  # -- score --------------------------------------------------------------------------------------------

  def score(self, state: dict[str, Any], ref: Params | None, batch: dict[str, jax.Array],
            layout: layout_lib.Layout | None = None) -> dict[str, jax.Array]:
    """Old log-probs (the current actor), reference log-probs (`ref`, None = no KL) and values, each
    `[b, w]`, in micro-batches of `ppo.score_micro_batch_size`: each padded to its own length when a `layout`
    (`self.layout`) is given, else the whole batch's shape in one program."""
    batch = {k: batch[k] for k in ("tokens", "attention_mask", "index")}
    if layout is not None:
      return self._score_in_layout(state, ref, batch, layout)
    if self._score is None:
      self._score = jax.jit(self._score_fn)
    return self._score(state, ref, batch)

  def _score_rows(self, state, ref, mb, prefixes=None):
    """Scores of one micro-batch `{tokens, attention_mask, index}`; with `prefixes` (`_score_prefixes`) the
    rows are the continuations of a shared prefix."""
    cdt = self.compute_dtype
    pre = prefixes or {}
    actor = state["actor"]["params"]
    tokens, mask, index = mb["tokens"], mb["attention_mask"], mb["index"]
    hidden = heads.hidden_states(self.config, heads.policy_params(actor), tokens, mask, cdt,
                                 unroll=self.unroll, constrain=self._rows, prefix=pre.get("actor"))
    out = {"old_logp": heads.logprobs_from_hidden(actor, hidden, tokens, index, False,
                                             self.settings.temperature)[0]}
    if ref is not None:
      out["ref_logp"] = heads.token_logprobs(self.config, ref, tokens, mask, index, cdt, unroll=self.unroll,
                                       constrain=self._rows, prefix=pre.get("ref"),
                                       temperature=self.settings.temperature)
    if self.shared_head:
      out["values"] = heads.values_from_hidden(actor["value_head"], hidden, index)
    elif self.separate_critic:
      out["values"] = heads.token_values(self.config, state["critic"]["params"], tokens, mask, index, cdt,
                                   unroll=self.unroll, constrain=self._rows, prefix=pre.get("critic"))
    return out

  # -- a prefix shared by every row (ppo.shared_prefix, with a layout) -----------------------------------

  def _backbone(self, name: str, params: Params) -> Params:
    return heads.policy_params(params) if name in ("actor", "ref") else params["backbone"]

  def _prefix(self, name: str, params: Params, tokens) -> tuple[jax.Array, jax.Array]:
    """The keys/values of the shared prefix `tokens [1, p]` under learner `name`'s parameters, in float32:
    the continuations cast them to the compute dtype, so their gradient (summed over micro-batches) stays
    float32."""
    kv = prefix_kv(self.config, self._backbone(name, params), tokens, compute_dtype=self.compute_dtype,
                   unroll=self.unroll)
    return jax.tree.map(lambda x: x.astype(jnp.float32), kv)

  def _score_prefixes(self, state, ref, tokens):
    out = {"actor": self._prefix("actor", state["actor"]["params"], tokens)}
    if ref is not None:
      out["ref"] = self._prefix("ref", ref, tokens)
    if self.separate_critic:
      out["critic"] = self._prefix("critic", state["critic"]["params"], tokens)
    return out

  def _prefix_tokens(self, batch, layout):
    """`[1, layout.prefix]`: the tokens every row begins with (row 0's), or None without a shared prefix."""
    if not layout.prefix:
      return None
    return self._jit("prefix_tokens", lambda tokens, *, n: tokens[:1, :n], static_argnames=("n",))(
        batch["tokens"], n=layout.prefix)

  @staticmethod
  def _score_defaults(out, ref, zeros):
    out = dict(out)
    out.setdefault("ref_logp", out["old_logp"] if ref is None else zeros)
    out.setdefault("values", zeros)
    return out

  def _score_fn(self, state, ref, batch):
    self.trace_counts["score"] += 1  # runs at trace time only
    self.traces.append(("score", tracing.signature(state, ref, batch)))

    def one(_, mb):
      return None, self._score_rows(state, ref, mb)

    _, out = jax.lax.scan(one, None, self._split(batch, self.settings.score_micro_batch_size),
                          unroll=self.unroll)
    out = {k: self.placement.constrain_rows(self._merge(v), 0) for k, v in out.items()}
    return self._score_defaults(out, ref, jnp.zeros(batch["index"].shape, jnp.float32))

  # -- update -------------------------------------------------------------------------------------------

  def update(self, state: dict[str, Any], batch: dict[str, jax.Array],
             layout: layout_lib.Layout | None = None) -> tuple[dict[str, Any], dict]:
    """One PPO step on a scored batch (`BATCH_KEYS` + `old_logp`, `ref_logp`, `values`), with micro-batches
    padded to their own lengths when a `layout` is given. The state is donated: use the returned one."""
    if layout is not None:
      return self._update_in_layout(state, batch, layout)
    if self._update is None:
      shardings = self.state_shardings
      out = None if shardings is None else (shardings, self.placement.replicated())
      self._update = jax.jit(self._update_fn, donate_argnums=0, out_shardings=out)
    return self._update(state, batch)

  def _advantages(self, batch):
    s = self.settings
    policy = batch["policy_mask"].astype(jnp.float32)
    response = batch["response_mask"].astype(jnp.float32)
    rewards, kl = ppo_lib.token_rewards(batch["token_scores"], batch["old_logp"], batch["ref_logp"], policy,
                                        kl_coef=s.kl_coef, kl_estimator=s.kl_estimator, kl_mode=s.kl_mode)
    advantages, returns = ppo_lib.advantages_and_returns(
        s.adv_estimator, rewards, batch["values"], response, policy, batch["group"], gamma=s.gamma, lam=s.lam)
    metrics = {"reward/kl": ppo_lib.masked_mean(kl, policy),
               "reward/token_reward_sum": jnp.mean(jnp.sum(rewards * response, axis=1)),
               "ppo/advantage_mean": ppo_lib.masked_mean(advantages, policy),
               "ppo/return_mean": ppo_lib.masked_mean(returns, response)}
    if self.with_critic:
      metrics["critic/value_mean"] = ppo_lib.masked_mean(batch["values"], response)
      metrics["critic/explained_variance"] = ppo_lib.explained_variance(batch["values"], returns, response)
    return advantages, returns, metrics

  def _actor_terms(self, params, mb, norm, prefix=None):
    """The loss of one micro-batch (sums divided by `norm`'s token counts, which make the configured token
    mean) and its summed metric terms; with `prefix` (`_prefix`) the rows continue a shared prefix."""
    s = self.settings
    tokens = mb["tokens"]
    hidden = heads.hidden_states(self.config, heads.policy_params(params), tokens, mb["attention_mask"],
                                 self.compute_dtype, self.remat, self.unroll, self._rows, prefix)
    logp, entropy = heads.logprobs_from_hidden(params, hidden, tokens, mb["index"], True, s.temperature)
    loss, sums = ppo_lib.actor_loss(
        logp, entropy, mb["old_logp"], mb["ref_logp"], mb["advantages"], mb["policy_mask"], norm,
        clip_ratio=s.clip_ratio, dual_clip=s.dual_clip, entropy_coef=s.entropy_coef, kl_coef=s.kl_coef,
        kl_estimator=s.kl_estimator, kl_mode=s.kl_mode)
    if self.shared_head:  # L_pi + vf_coef · L_V through the one trunk
      values = heads.values_from_hidden(params["value_head"], hidden, mb["index"])
      value_loss, value_sums = ppo_lib.critic_loss(values, mb["values"], mb["returns"], mb["response_mask"],
                                                   norm, value_clip=s.value_clip)
      loss, sums = loss + s.vf_coef * value_loss, {**sums, **value_sums}
    return loss, sums

  def _critic_terms(self, params, mb, norm, prefix=None):
    values = heads.token_values(self.config, params, mb["tokens"], mb["attention_mask"], mb["index"],
                          self.compute_dtype, self.remat, self.unroll, self._rows, prefix)
    return ppo_lib.critic_loss(values, mb["values"], mb["returns"], mb["response_mask"], norm,
                               value_clip=self.settings.value_clip)

  def _learn(self, learner, terms, opt, micro, minibatch):
    """Accumulates gradients over the minibatch's micro-batches, clips, applies; returns the new learner
    state, the minibatch's metric sums and the gradient norm before clipping."""
    n_micro = self.settings.mini_batch_size // micro
    whole = _token_counts(minibatch)
    params = learner["params"]

    def body(grads, mb):
      norm = ppo_lib.loss_norm(_token_counts(mb), whole, loss_agg=self.settings.loss_agg, n_micro=n_micro)
      (_, sums), g = jax.value_and_grad(terms, has_aux=True)(params, mb, norm)
      return jax.tree.map(jnp.add, grads, g), sums

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, sums = jax.lax.scan(body, zeros, self._split(minibatch, micro), unroll=self.unroll)
    sums = jax.tree.map(jnp.sum, sums)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = opt.update(grads, learner["opt"], params)
    return {"params": optax.apply_updates(params, updates), "opt": opt_state}, sums, grad_norm

  def _update_fn(self, state, batch):
    self.trace_counts["update"] += 1
    self.traces.append(("update", tracing.signature(state, batch)))
    s = self.settings
    advantages, returns, metrics = self._advantages(batch)
    data = {**{k: batch[k] for k in ("tokens", "attention_mask", "index", "policy_mask", "response_mask",
                                     "old_logp", "ref_logp", "values")},
            "advantages": advantages, "returns": returns}
    n_mini = s.batch_size // s.mini_batch_size
    # Minibatch m holds rows m*mini ... (m+1)*mini - 1 of the batch, in order (s3: no shuffle).
    minibatches = jax.tree.map(lambda x: x.reshape(n_mini, s.mini_batch_size, *x.shape[1:]), data)
    minibatches = jax.tree.map(lambda x: self.placement.constrain_rows(x, 1), minibatches)

    def minibatch_step(st, mb):
      actor, sums, norm = self._learn(st["actor"], self._actor_terms, self.actor_opt,
                                      s.actor_micro_batch_size, mb)
      new = {"actor": actor}
      out = _minibatch_metrics("actor", sums, norm, _token_counts(mb))
      if self.separate_critic:
        critic, csums, cnorm = self._learn(st["critic"], self._critic_terms, self.critic_opt,
                                           s.critic_micro_batch_size, mb)
        new["critic"] = critic
        out.update(_minibatch_metrics("critic", csums, cnorm, _token_counts(mb)))
      return new, out

    def epoch(st, _):
      return jax.lax.scan(minibatch_step, st, minibatches, unroll=self.unroll)

    state, per_step = jax.lax.scan(epoch, state, None, length=s.epochs, unroll=self.unroll)
    return state, self._step_metrics(state, metrics, per_step)

  def _step_metrics(self, state, metrics, per_step):
    """The step's metrics: the batch's, the minibatch steps' means (`per_step`: arrays over steps) and the
    learning rates that were used."""
    metrics = {**metrics, **{k: jnp.mean(v) for k, v in per_step.items()}}
    count = optimizer_lib.update_count(state["actor"]["opt"])  # after this update
    metrics["actor/lr"] = self.actor_lr(count - 1)
    if self.with_critic:
      metrics["critic/lr"] = self.critic_lr(count - 1)
    return metrics

  # -- micro-batches padded to their own lengths (ppo.micro_batch_padding=own, `layout.py`) --------------

  def layout(self, batch: dict[str, np.ndarray]) -> layout_lib.Layout | None:
    """The micro-batch layout of a host batch (this process's rows; every process's row lengths decide it,
    so all get the same), or None with `ppo.micro_batch_padding=batch` (one shape for the whole batch)."""
    if self.settings.micro_batch_padding == "batch":
      return None
    lengths, widths = (sharding_lib.host_gather(x) for x in layout_lib.row_extents(batch))
    prefix = 0
    if self.settings.shared_prefix:
      prefix = layout_lib.shared_prefix_length(batch, multiple=1)
      if jax.process_count() > 1:  # the prefix every process's rows share (hosts' batches differ in length)
        prefix = int(sharding_lib.host_gather(np.asarray([prefix])).min())
        firsts = sharding_lib.host_gather(np.asarray(batch["tokens"])[:1, :prefix])
        prefix = layout_lib.common_prefix_length(firsts)
      prefix = prefix // layout_lib.PREFIX_MULTIPLE * layout_lib.PREFIX_MULTIPLE
    return layout_lib.plan(lengths, widths, self.settings, length=np.shape(batch["tokens"])[1],
                           width=np.shape(batch["index"])[1], prefix=prefix)

  def _jit(self, name: str, fn, **kwargs):
    """`fn` jitted once per learner (and recorded in `traces` at each trace, with its static arguments)."""
    if name not in self._jitted:
      static = kwargs.pop("static_argnames", ())

      def traced(*args, **kw):
        self.trace_counts[name] = self.trace_counts.get(name, 0) + 1
        self.traces.append((name, tracing.signature(*args, **kw)))
        return fn(*args, **kw)
      self._jitted[name] = jax.jit(traced, static_argnames=static, **kwargs)
    return self._jitted[name]

  def _row_ids(self, rows) -> jax.Array:
    ids = np.asarray(rows, np.int32)
    if self.mesh is None:
      return jnp.asarray(ids)
    return jax.device_put(ids, self.placement.replicated())

  def _gather(self, data, rows, length: int, width: int, start: int = 0):
    """The micro-batch of `rows`: sequences cut to positions `start ... length - 1` (`start`: a shared
    prefix's length), window arrays to `width` (slots past a row's end point at its last position, as in
    the whole batch), `index` counted from `start`."""
    out = {}
    for k, x in data.items():
      x = jnp.take(x, rows, axis=0)
      out[k] = self._rows(x[:, start:length] if k in ("tokens", "attention_mask") else x[:, :width])
    out["index"] = jnp.minimum(out["index"], length - 1) - start
    return out

  def _score_in_layout(self, state, ref, batch, layout):
    score = self._jit("score", lambda st, r, data, rows, pre, *, length, width, start:
                      self._score_rows(st, r, self._gather(data, rows, length, width, start), pre),
                      static_argnames=("length", "width", "start"))
    put = self._jit("score_put", lambda full, part, rows: jax.tree.map(
        lambda f, p: f.at[rows, :p.shape[1]].set(p), full, part), donate_argnums=0)
    zeros = self._jit("score_zeros", lambda index, *, keys: {k: (index * 0).astype(jnp.float32)
                                                              for k in keys}, static_argnames=("keys",))
    prefix_tokens = self._prefix_tokens(batch, layout)
    prefixes = None
    if prefix_tokens is not None:  # each model's keys/values of the shared prefix, once for the whole batch
      prefixes = self._jit("score_prefix", self._score_prefixes)(state, ref, prefix_tokens)
    full = None
    for mb in layout.score:
      rows = self._row_ids(mb.rows)
      part = score(state, ref, batch, rows, prefixes, length=mb.length, width=mb.width, start=layout.prefix)
      full = put(zeros(batch["index"], keys=tuple(sorted(part))) if full is None else full, part, rows)
    return self._score_defaults(full, ref, zeros(batch["index"], keys=("zeros",))["zeros"])

  def _update_in_layout(self, state, batch, layout):
    s = self.settings
    prepare = self._jit("update_prepare", self._prepare_fn)
    data, metrics = prepare(batch)
    counts = self._jit("update_counts", lambda d, rows: _token_counts(
        {k: jnp.take(d[k], rows, axis=0) for k in ("policy_mask", "response_mask")}))
    learners = [("actor", self._actor_terms, self.actor_opt, layout.actor)]
    if self.separate_critic:
      learners.append(("critic", self._critic_terms, self.critic_opt, layout.critic))
    prefix_tokens = self._prefix_tokens(batch, layout)
    per_step = []
    for _ in range(s.epochs):
      for m in range(s.batch_size // s.mini_batch_size):
        whole = counts(data, self._row_ids(range(m * s.mini_batch_size, (m + 1) * s.mini_batch_size)))
        out = {}
        for name, terms, opt, micro_batches in learners:
          state = {**state, name: self._learn_in_layout(name, terms, opt, state[name], data, micro_batches[m],
                                                        whole, out, prefix_tokens)}
        per_step.append(out)
    finish = self._jit("update_finish", lambda st, met, steps: self._step_metrics(
        st, met, {k: jnp.stack([o[k] for o in steps]) for k in steps[0]}))
    return state, finish(state, metrics, per_step)

  def _prepare_fn(self, batch):
    """Advantages and returns over the whole batch (no model runs), and the arrays micro-batches take."""
    advantages, returns, metrics = self._advantages(batch)
    data = {**{k: batch[k] for k in ("tokens", "attention_mask", "index", "policy_mask", "response_mask",
                                     "old_logp", "ref_logp", "values")},
            "advantages": advantages, "returns": returns}
    return data, metrics

  def _learn_in_layout(self, name, terms, opt, learner, data, micro_batches, whole, out, prefix_tokens=None):
    """One minibatch step of one learner: a gradient per micro-batch (each its own shape), summed, clipped,
    applied; the minibatch's metrics go into `out`.

    With a shared prefix (`prefix_tokens [1, p]`) its keys/values are computed once for the minibatch; each
    micro-batch's gradient also has a part for them, summed over the micro-batches and pulled back through
    the prefix's forward pass once at the end (one vjp at batch 1): the same gradient as running every row
    whole, without recomputing the prefix for every row."""
    n_micro = len(micro_batches)
    shardings = None if self.state_shardings is None else self.state_shardings[name]
    start = 0 if prefix_tokens is None else prefix_tokens.shape[1]

    def grad(params, prefix, data, rows, whole, *, length, width):
      mb = self._gather(data, rows, length, width, start)
      norm = ppo_lib.loss_norm(_token_counts(mb), whole, loss_agg=self.settings.loss_agg, n_micro=n_micro)
      (_, sums), (g, g_prefix) = jax.value_and_grad(terms, argnums=(0, 3), has_aux=True)(
          params, mb, norm, prefix)
      if shardings is not None:
        g = jax.lax.with_sharding_constraint(g, shardings["params"])
      return {"params": g, "prefix": g_prefix}, sums

    def apply(learner, grads, sums, whole, prefix_tokens):
      g = grads["params"]
      if prefix_tokens is not None:  # the prefix's part of the gradient, through its forward pass
        _, pull = jax.vjp(lambda p: self._prefix(name, p, prefix_tokens), learner["params"])
        g = jax.tree.map(jnp.add, g, pull(grads["prefix"])[0])
      grad_norm = optax.tree.norm(g)
      updates, opt_state = opt.update(g, learner["opt"], learner["params"])
      new = {"params": optax.apply_updates(learner["params"], updates), "opt": opt_state}
      return new, _minibatch_metrics(name, sums, grad_norm, whole)

    # The model's programs are "score" and "update" (the actor's gradient) as in the whole-batch path.
    grad_fn = self._jit("update" if name == "actor" else f"update_{name}", grad,
                        static_argnames=("length", "width"))
    add = self._jit("update_add", lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
    replicated = self.placement.replicated()
    apply_fn = self._jit(f"update_{name}_apply", apply, donate_argnums=0,
                         out_shardings=None if shardings is None else (shardings, replicated))
    prefix = None
    if prefix_tokens is not None:
      prefix = self._jit(f"update_{name}_prefix", self._prefix, static_argnames=("name",))(
          name=name, params=learner["params"], tokens=prefix_tokens)
    total = None
    for mb in micro_batches:
      g = grad_fn(learner["params"], prefix, data, self._row_ids(mb.rows), whole, length=mb.length,
                  width=mb.width)
      total = g if total is None else add(total, g)
    new, metrics = apply_fn(learner, total[0], total[1], whole, prefix_tokens)
    out.update(metrics)
    return new


def _token_counts(mb):
  return ppo_lib.token_counts(mb["policy_mask"], mb["response_mask"])


def _minibatch_metrics(name: str, sums, grad_norm, counts):
  """A learner's metrics for one minibatch step from its summed terms: the actor's per policy token (its
  value terms, with a shared head, per response token), the critic's per response token."""
  policy_tokens = jnp.maximum(counts["policy"], 1.0)
  response_tokens = jnp.maximum(counts["response"], 1.0)
  out = {}
  for k, v in sums.items():
    if k in ("vf_loss", "vf_clipfrac"):
      out[f"critic/{k}"] = v / response_tokens
    else:
      out[f"{name}/{k}"] = v / policy_tokens
  out[f"{name}/grad_norm"] = grad_norm
  return out
