"""Train an s3 searcher with PPO (s3_protocol.md §6): the product's main job.

  python -m s3_jax.train --config configs/NAME.py[:arg] [--config.key=value ...] [--workdir DIR]

Reads top to bottom: config → mesh → services → data → models → resume or start → loop → checkpoints.
Rerunning the same command on the same workdir resumes from the latest checkpoint (`config.total_steps`
may be raised to train further). The workdir receives `config.json`, `metrics.jsonl` (one JSON object per
step), `tensorboard/`, `checkpoints/`, `hf/step_N/` exports of the searcher and `training_curves.png`.

Test hook: `S3_JAX_KILL_AT_STEP=N` kills the process (SIGKILL, no cleanup) just before step N starts, to test
resumption after a crash.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from s3_jax import assets, compile_cache, config_lib, host_memory
from s3_jax import metrics as metrics_lib
from s3_jax import sharding as sharding_lib
from s3_jax.checkpoint import Checkpointer, CheckpointError, CheckpointMismatchError, check_writable
from s3_jax.data.training import TrainingData, load_training_data
from s3_jax.models import heads, precision
from s3_jax.models import tokenizer as tokenizer_lib
from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import Decoder, ValueModel, init_value_head
from s3_jax.models.sampler import Sampler
from s3_jax.models.searcher import decoder_config as searcher_decoder_config
from s3_jax.models.tokenizer import load_tokenizer
from s3_jax.precompute import precompute_dir, run_precompute
from s3_jax.reward.cache import AnswerCache
from s3_jax.reward.scorer import scorer_from_config
from s3_jax.rl import experience
from s3_jax.rl.learner import PPOLearner
from s3_jax.rl.settings import PPOSettings
from s3_jax.search.episode import EpisodeConfig, SamplerPolicy
from s3_jax.services.connect import open_services


def main(config: ml_collections.ConfigDict, workdir: str | Path, *, show_progress: bool = True,
         log: Callable[[str], None] = print) -> list[dict[str, float]]:
  """Runs (or resumes) training to `config.total_steps`; returns this run's metric rows."""
  # Config and mesh.
  sharding_lib.maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  _record_config(config, workdir, log if is_main else None)
  compile_cache.enable(config.compile_cache, log if is_main else None)
  check_writable(workdir / "checkpoints")  # before anything slow: an unwritable folder fails here, by path
  mesh = sharding_lib.make_mesh(dict(config.mesh))
  log(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.default_backend()} device(s); "
      f"workdir {workdir}")

  with open_services(config, show_progress=show_progress, log=log) as services:
    # Data: s3's filtered questions and their naive-RAG results (computed first if missing).
    data = _training_data(config, services, show_progress, log)

    # Models: the searcher (actor), its critic, the frozen reference, the sampler.
    tokenizer = load_tokenizer(assets.resolve(config.searcher.tokenizer))
    pad_id = tokenizer_lib.pad_id(tokenizer)
    settings = PPOSettings.from_config(config)
    actor_model, critic = _init_models(config, settings, tokenizer)
    learner = PPOLearner(settings, actor_model.config, mesh=mesh,
                                    compute_dtype=precision.dtype(config.searcher.compute_dtype),
                                    rules=[tuple(r) for r in config.sharding_rules],
                                    remat=config.searcher.remat)
    actor = actor_model.arrays()
    ref = learner.place_ref(actor) if settings.kl_coef > 0 else None  # frozen initial actor (KL)
    if learner.shared_head:
      actor["value_head"] = init_value_head(actor_model.config, jax.random.key(config.seed + 2),
                                                       kernel=config.critic.head_init)
    state = learner.init_state(actor, critic if learner.separate_critic else None)
    del actor, critic
    # Rollouts run on every host over its own questions, so each samples on its own devices.
    sampler = Sampler(actor_model, tokenizer=tokenizer, pad_token_id=pad_id,
                      mesh=sharding_lib.rollout_mesh(dict(config.mesh)),
                      rules=[tuple(r) for r in config.sampling_sharding_rules],
                      attention_kernel=config.rollout.attention_kernel,
                      matmul_kernel=config.rollout.matmul_kernel,
                      compute_dtype=precision.sampling_dtype(config))
    log(f"sampler: {jnp.dtype(sampler.compute_dtype).name} compute, decode attention by "
        f"{sampler.attention_kernel} ({sampler.attention_note}), weight matmuls of prefills and decode steps "
        f"by {sampler.matmul_kernel} ({sampler.matmul_note}), "
        f"KV cache in {jnp.dtype(sampler.cache_dtype).name}")
    scorer = scorer_from_config(config, services.generator, kind=config.reward.kind, rag_cache=data.rag_cache,
                                cache=AnswerCache(sharding_lib.per_process_name(
                                    config.reward.cache or workdir / "answers.sqlite")))
    log(f"reward {config.reward.kind}: answers by {scorer.generator_id}, judged by {scorer.judge_id}")

    # Resume from the latest checkpoint, or start at step 0.
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep, log=log)
    rng = np.asarray(jax.random.key_data(jax.random.key(config.seed)))  # host data: saved by any process
    step = 0
    if checkpointer.latest_step():  # the newest intact one: a corrupt step is reported and the previous used
      restored, meta, step = checkpointer.restore({"learner": state, "rng": rng})
      # The key comes back committed to one device; as host data it goes wherever the sampler runs.
      state, rng = restored["learner"], jax.device_get(restored["rng"])
      if meta["data_position"] != data.position(step):
        raise ValueError(f"checkpoint {step}: data position {meta['data_position']} != {data.position(step)} "
                         f"for this config (training set or batch size changed?)")
      log(f"resumed from {workdir / 'checkpoints'} at step {step} "
          f"(data epoch {meta['data_position']['epoch']})")
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, wandb=config.wandb.to_dict(),
                                      config=config.to_dict())
    writer.truncate_after(step)
    saved_step = step if step else None

    # The loop: rollouts → rewards → score → update, one PPO step per batch of questions.
    episode_config = EpisodeConfig.from_config(config)
    watch = metrics_lib.Stopwatch()
    rows = []
    progress = _progress(step, config.total_steps, show_progress and is_main)
    try:
      while step < config.total_steps:
        if os.environ.get("S3_JAX_KILL_AT_STEP") == str(step + 1):
          os.kill(os.getpid(), signal.SIGKILL)
        examples, initial = data.batch(step)
        with watch("step"):
          try:
            policy = _sampling_policy(sampler, state, rng, step, config)
            episodes = experience.rollout(
                policy, tokenizer, services.retriever, examples, _initial_blocks(initial, config),
                episode_config, samples_per_question=config.rollout.samples_per_question, watch=watch)
            sampler.release_params()  # until the next step's rollout: not needed by the stages below
            with watch("reward"):
              items, results = experience.reward(scorer, episodes, tokenizer, config.rollout,
                                                 episode_config.max_select)
            host_batch = experience.training_batch(
                episodes, [r.reward for r in results], pad_id=pad_id,
                samples_per_question=config.rollout.samples_per_question,
                max_length=config.rollout.max_prompt_length, group_offset=jax.process_index() * len(examples))
            rollout_metrics = experience.rollout_metrics(episodes, items, results, scorer)
            records = (experience.episode_records(episodes, items, results, step + 1)
                       if config.checkpoint.rollouts else None)
            del episodes, items, results
          except Exception as e:  # the state is untouched: save it, so a rerun resumes right here
            if step and saved_step != step:
              try:
                _save(checkpointer, step, state, rng, data, config)
              except CheckpointError as save_error:
                raise RuntimeError(f"step {step + 1} failed during rollout/reward: {e}; saving the state "
                                   f"after step {step} failed too: {save_error}") from e
            raise RuntimeError(f"step {step + 1} failed during rollout/reward: {e}. The state after step "
                               f"{step} is saved in {workdir / 'checkpoints'}; fix the cause and rerun the "
                               f"same command to resume.") from e
          host_memory.release()  # each stage's freed buffers go back to the OS before the next one's peak
          with watch("score"):
            layout = learner.layout(host_batch)  # micro-batches padded to their own length (None: batch's)
            batch = learner.place_batch(host_batch)
            scored = jax.block_until_ready(learner.score(state, ref, batch, layout))
          host_memory.release()
          with watch("update"):
            state, step_metrics = learner.update(state, {**batch, **scored}, layout)
            step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          host_memory.release()
        step += 1
        if records is not None:
          _save_rollouts(workdir, step, records)
        row = {**rollout_metrics, **step_metrics, **_times(watch.take()), **{
            f"data/{k}": float(v) for k, v in data.position(step - 1).items()}}
        metrics_lib.check_finite(row, step, saved_step)
        writer.write(step, row)
        rows.append(row)
        progress.update(1)
        if is_main:
          progress.write(writer.summary_line(step, config.total_steps, row))
        if step % config.checkpoint.every == 0 or step == config.total_steps:
          _save(checkpointer, step, state, rng, data, config)
          saved_step = step
        if config.checkpoint.hf_export_every and step % config.checkpoint.hf_export_every == 0:
          _export(state, actor_model.config, workdir / "hf" / f"step_{step}", config, log)
    finally:
      progress.close()
      writer.close()
      checkpointer.close()
  if is_main and metrics_lib.read_metrics(workdir):
    log(f"training curves: {metrics_lib.plot_curves(workdir)}")
  return rows


# -- pieces of main, in the order it uses them ---------------------------------------------------------

def _record_config(config: ml_collections.ConfigDict, workdir: Path,
                   log: Callable[[str], None] | None) -> None:
  """Writes `config.json`; on a resumed run, names the keys that changed since the first run."""
  resolved = json.loads(config.to_json_best_effort(sort_keys=True))
  path = workdir / "config.json"
  if path.is_file() and log is not None:
    before = config_lib.flatten_record(json.loads(path.read_text()))
    now = config_lib.flatten(resolved)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
      log("note: config changed since this workdir's last run: "
          + ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed))
  if log is not None:
    path.write_text(json.dumps(resolved, indent=2, sort_keys=True) + "\n")


def _training_data(config, services, show_progress, log) -> TrainingData:
  folder = precompute_dir(config)
  if not (folder / "train_filtered.jsonl").is_file():
    log(f"no naive-RAG precompute for this config in {folder}: running it now "
        f"(python -m s3_jax.precompute --config ...; done once, then reused)")
  # Every host answers its share of the questions (process 0 writes the folder, or each host its own copy).
  run_precompute(_with_splits(config, "train"), folder, retriever=services.retriever,
                 generator=services.generator, show_progress=show_progress, log=log)
  return load_training_data(folder, batch_size=config.ppo.batch_size, seed=config.data.shuffle_seed,
                            process_index=jax.process_index(), process_count=jax.process_count())


def _with_splits(config: ml_collections.ConfigDict, splits: str) -> ml_collections.ConfigDict:
  """The config with only the training split precomputed (the trainer needs nothing else)."""
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.precompute.splits = splits
  return copy


def _init_models(config, settings, tokenizer) -> tuple[Decoder, dict | None]:
  """The actor `Decoder` and the separate critic's arrays (None without one): loaded from
  `searcher.init_from` (the critic's backbone too, with a fresh head, as s3 does), or random."""
  from s3_jax.models.hf import load_hf

  param_dtype = precision.DTYPES[config.searcher.param_dtype]
  compute_dtype = precision.dtype(config.searcher.compute_dtype)
  if config.searcher.init_from:
    folder = assets.resolve(config.searcher.init_from)
    actor = load_hf(folder, dtype=param_dtype, compute_dtype=compute_dtype)
    critic = load_hf(folder, dtype=jnp.float32, value_head=True, seed=config.seed + 1) if (
        settings.uses_critic and settings.separate_critic) else None
  else:
    decoder_config = searcher_decoder_config(config, tokenizer)
    actor = Decoder(decoder_config, rngs=nnx.Rngs(config.seed), param_dtype=param_dtype,
                    compute_dtype=compute_dtype)
    critic = ValueModel(decoder_config, rngs=nnx.Rngs(config.seed + 1)) if (
        settings.uses_critic and settings.separate_critic) else None
  return actor, None if critic is None else heads.critic_params(critic)


def _sampling_policy(sampler: Sampler, state, rng, step: int, config) -> SamplerPolicy:
  """The sampler loaded with the actor's current weights (cast to `rollout.param_dtype`), as this step's
  rollout policy with its own key."""
  params = heads.cast_floats(heads.policy_params(state["actor"]["params"]),
                                  precision.DTYPES.get(config.rollout.param_dtype))
  sampler.set_params(params if jax.process_count() == 1 else sharding_lib.host_fetch(params))
  return SamplerPolicy(sampler, temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                       top_k=config.rollout.top_k, keep_cache=config.rollout.keep_cache,
                       rng=jax.random.fold_in(jax.random.wrap_key_data(rng), step))


def _initial_blocks(initial, config) -> list[list]:
  """Each question's first information block: its naive-RAG top `rollout.initial_docs` with begin-with-search
  (s3's default), none without."""
  return [docs[:config.rollout.initial_docs] if config.rollout.begin_with_search else [] for docs in initial]


def _times(seconds: dict[str, float]) -> dict[str, float]:
  """`time/*` keys: sample, retrieve, reward, score, update, step, and rollout_host (the rollout's own
  Python work: parsing, formatting, tokenizing observations)."""
  out = {f"time/{k}": 0.0 for k in ("sample", "retrieve", "reward", "score", "update")}
  out.update({f"time/{k}": v for k, v in seconds.items() if k != "rollout"})
  if "rollout" in seconds:
    out["time/rollout_host"] = max(0.0, seconds["rollout"] - seconds.get("sample", 0.0)
                                   - seconds.get("retrieve", 0.0))
  return out


def _save(checkpointer: Checkpointer, step: int, state, rng, data: TrainingData, config) -> None:
  checkpointer.save(step, {"learner": state, "rng": rng},
                    {"step": step, "data_position": data.position(step), "total_steps": config.total_steps})


def _save_rollouts(workdir: Path, step: int, records: list[dict]) -> None:
  """Step `step`'s episodes as `rollouts/step_{step}.jsonl` (each process its own file), written whole and
  renamed into place, so a rerun of the step replaces it and a crash never leaves half a file."""
  folder = workdir / "rollouts"
  folder.mkdir(exist_ok=True)
  path = sharding_lib.per_process_name(folder / f"step_{step}.jsonl")
  partial = path.with_name(path.name + ".partial")
  partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
  partial.replace(path)


def _export(state, decoder_config: DecoderConfig, folder: Path, config, log) -> None:
  """Every process gathers the searcher (a collective); process 0 writes it."""
  from s3_jax.models.hf import save_hf_params

  params = sharding_lib.host_fetch(heads.policy_params(state["actor"]["params"]))
  if jax.process_index() != 0:
    return
  save_hf_params(params, decoder_config, folder, assets.resolve(config.searcher.tokenizer))
  log(f"exported the searcher to {folder}")


def _progress(step: int, total: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(total=total, initial=step, desc="PPO steps", unit="step", disable=not enabled,
              dynamic_ncols=True)


def cli(argv: Sequence[str] | None = None) -> None:
  from absl import flags

  from s3_jax import cli as cli_lib

  config_flag = cli_lib.config_flag()
  workdir_flag = flags.DEFINE_string("workdir", None, "run folder (default: runs/<config name>[_<arg>])")
  cli_lib.run(lambda config: main(config, workdir_flag.value or _default_workdir(cli_lib.config_filename())),
              config_flag, argv=argv, errors=(CheckpointError, CheckpointMismatchError))


def _default_workdir(config_spec: str) -> str:
  path, _, arg = config_spec.partition(":")
  name = Path(path).stem + (f"_{arg.replace(',', '_').replace('=', '-')}" if arg else "")
  return str(Path("runs") / name)


if __name__ == "__main__":
  cli()
