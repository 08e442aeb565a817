"""The PPO update step's achieved FLOP/s against this machine's measured matmul peak (SmolLM2-135M-size actor
and critic), and the per-step time split of real training runs (tiny and SmolLM2 configs).

  python benchmarks/train_step.py [--batch 8] [--length 1024] [--window 256] [--micro 2] [--runs tiny,smollm2]
  python benchmarks/train_step.py --whole-step [--questions 16] [--paths old,new,new-shared]
  python benchmarks/train_step.py --whole-step --paths at:4d143a6,new-shared-full   # vs the pre-issue code

`--whole-step`: whole PPO steps of `configs/smollm2_wiki.py:runlocal` at `--questions` questions and 3-3-3
sizes (topk 3, 3 selected, 3 turns), one process per path, the same questions and seed: the time split of the
last of `--whole-steps` steps (default 2; the first compiles) and each process's peak RSS. Paths
(`WHOLE_STEP_PATHS`): `old` = fp32, every turn re-prefilled, micro-batches padded to the whole batch (the
path before the fast-step work; the sampler's newer kernels, compaction and length groups and the learner's
blocked attention and chunked logits apply to it too, so it understates the gain), `new` = the defaults,
`new-shared` = + a value head on the actor, `new-shared-bf16` = + bf16 compute, `new-shared-full` =
`new-shared` with whole-layer rematerialisation (`searcher.remat=full`: layer inputs kept, not every
matmul's output; s3's gradient checkpointing), `new-shared-full-bf16` = that with bf16 compute. `at:REV` =
commit REV's own code and defaults in a worktree of its own (`at:4d143a6` is the code before the fast-step
work: what the issue calls today's path).

FLOPs are the model's matmul work counted analytically (the usual MFU convention: forward 2·N per token for
the actor and critic backbones plus attention and the window's vocabulary projection, backward twice that;
rematerialisation not counted). Peak is the best of several jitted float32 matmuls of the model's shapes and
square ones.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import checkout

REPO = Path(__file__).resolve().parent.parent


def matmul_peak(repeats: int = 5) -> tuple[float, str]:
  import jax
  import jax.numpy as jnp

  best, best_shape = 0.0, ""
  for m, k, n in ((2048, 2048, 2048), (4096, 4096, 4096), (8192, 576, 1536), (8192, 1536, 576),
                  (8192, 576, 576), (4096, 576, 4096)):
    a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      f(a, b).block_until_ready()
      times.append(time.perf_counter() - start)
    rate = 2 * m * k * n / float(np.median(times))
    if rate > best:
      best, best_shape = rate, f"{m}x{k} @ {k}x{n}"
  return best, best_shape


def update_rate(batch: int, length: int, window: int, micro: int, repeats: int, remat: str = "full",
                dtype: str = "float32", critic: str = "separate") -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from s3_jax import assets
  from s3_jax.models import heads
  from s3_jax.models.decoder import Decoder, ValueModel, init_value_head
  from s3_jax.models.hf import read_config
  from s3_jax.rl import learner as learner_lib
  from s3_jax.rl.settings import PPOSettings

  config, _ = read_config(assets.path("smollm2-135m-instruct"))
  settings = PPOSettings(batch_size=batch, mini_batch_size=batch, actor_micro_batch_size=micro,
                                    critic_micro_batch_size=micro, score_micro_batch_size=micro,
                                    actor_lr=1e-6, critic_lr=1e-5, separate_critic=critic == "separate")
  learner = learner_lib.PPOLearner(settings, config, remat=remat,
                                  compute_dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype])
  actor = Decoder(config, rngs=nnx.Rngs(0)).arrays()
  if critic == "separate":  # s3: a second SmolLM2 with a value head
    state = learner.init_state(actor, heads.critic_params(ValueModel(config, rngs=nnx.Rngs(1))))
  else:  # a value head on the actor's trunk (critic.separate_model=False)
    value_head = init_value_head(config, jax.random.key(1))
    state = learner.init_state({**actor, "value_head": value_head}, None)
  rng = np.random.default_rng(0)
  prompt = length - window
  data = {"tokens": rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32),
          "attention_mask": np.ones((batch, length), bool),
          "index": np.tile(np.arange(prompt, length, dtype=np.int32), (batch, 1)),
          "policy_mask": rng.random((batch, window)) < 0.5, "response_mask": np.ones((batch, window), bool),
          "token_scores": np.zeros((batch, window), np.float32), "group": np.arange(batch, dtype=np.int32)}
  data["token_scores"][:, -1] = rng.choice([0.0, 1.0], batch)
  placed = learner.place_batch(data)
  scored = learner.score(state, None, placed)
  full = {**placed, **jax.device_get(scored)}
  full["ref_logp"] = full["old_logp"]
  start = time.perf_counter()
  compiled = jax.jit(learner._update_fn).lower(state, full).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost["flops"])
  temp_gb = compiled.memory_analysis().temp_size_in_bytes / 1e9
  state, metrics = learner.update(state, full)  # compile + warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = learner.update(state, full)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  # Analytic matmul work: forward 2·N_matmul per token for actor and critic backbones, logits on the window;
  # backward twice the forward; plus attention (4·t²·d per layer, forward, causal half not exploited).
  d, layers = config.hidden_size, config.num_layers
  per_layer = (d * config.num_heads * config.head_dim * 2 + d * config.num_kv_heads * config.head_dim * 2
               + 3 * d * config.intermediate_size)
  tokens = batch * length
  backbone = 2 * per_layer * layers * tokens + 4 * batch * length * length * d * layers
  models = 2 if critic == "separate" else 1  # backbones run forward and backward
  model_flops = 3 * (models * backbone + 2 * d * config.vocab_size * batch * window)
  return {"seconds": seconds, "xla_flops": flops, "model_flops": model_flops, "tokens": tokens,
          "temp_gb": temp_gb, "compile_s": compile_s}


WHOLE_STEP_PATHS = {
    "old": ["rollout.keep_cache=False", "searcher.compute_dtype=float32", "ppo.micro_batch_padding=batch",
            "ppo.shared_prefix=False"],
    "new": [],
    "new-shared": ["critic.separate_model=False"],
    "new-shared-bf16": ["critic.separate_model=False", "searcher.compute_dtype=bfloat16"],
    "new-shared-full": ["critic.separate_model=False", "searcher.remat=full"],
    "new-shared-full-noprefix": ["critic.separate_model=False", "searcher.remat=full",
                                 "ppo.shared_prefix=False"],
    "new-shared-full-bf16": ["critic.separate_model=False", "searcher.remat=full",
                             "searcher.compute_dtype=bfloat16"],
}


def _known_path(path: str) -> bool:
  return path in WHOLE_STEP_PATHS or (path.startswith("at:") and len(path) > 3)


def whole_step_child(path: str, questions: int, steps: int, repo: Path = REPO) -> dict:
  """In a process of its own: `steps` PPO steps of runlocal at 3-3-3; the last step's split and peak RSS.
  `repo`: whose code and configs run (an `at:REV` path's worktree: its defaults, no path overrides)."""
  import resource

  sys.path.insert(0, str(repo))
  import s3_jax

  if Path(s3_jax.__file__).resolve().parent != (repo / "s3_jax").resolve():
    raise SystemExit(f"imported {s3_jax.__file__}, not {repo}'s s3_jax")
  from s3_jax import config_lib, train
  from s3_jax import metrics as metrics_lib

  overrides = [f"total_steps={steps}", "checkpoint.hf_export_every=0", f"ppo.batch_size={questions}",
               f"ppo.mini_batch_size={max(1, questions // 2)}", "ppo.actor_micro_batch_size=2",
               "ppo.critic_micro_batch_size=2", "ppo.score_micro_batch_size=4", "rollout.topk=3",
               "rollout.max_select=3", "rollout.max_turns=3", *WHOLE_STEP_PATHS.get(path, [])]
  config = config_lib.load(f"{repo / 'configs' / 'smollm2_wiki.py'}:runlocal", overrides)
  with tempfile.TemporaryDirectory() as workdir:
    train.main(config, workdir, show_progress=False, log=lambda _: None)
    row = metrics_lib.read_metrics(workdir)[-1]
  split = {k: v for k, v in row.items() if k.startswith("time/")}
  keys = ("rollout/turns", "rollout/searches", "rollout/context_tokens", "rollout/policy_tokens",
          "reward/mean")
  return {**split, **{k: row[k] for k in keys if k in row},
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def whole_step(paths: list[str], questions: int, steps: int) -> None:
  results = {}
  for path in paths:
    repo = checkout(path[3:]) if path.startswith("at:") else REPO
    command = [sys.executable, __file__, "--whole-step-child", path, "--repo", str(repo), "--questions",
               str(questions), "--whole-steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
      raise SystemExit(f"path {path} failed:\n{done.stderr[-3000:]}")
    results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{path}: {json.dumps(results[path])}", flush=True)  # each path as it ends (a long run)
  first = results[paths[0]]["time/step"]
  print(f"whole PPO step, smollm2_wiki runlocal, {questions} questions, 3-3-3, last of {steps} steps")
  for path, r in results.items():
    parts = ", ".join(f"{k[5:]} {r[k]:.1f} s" for k in ("time/sample", "time/retrieve", "time/reward",
                                                         "time/score", "time/update") if k in r)
    print(f"  {path:<16} step {r['time/step']:7.1f} s ({first / r['time/step']:.2f}x {paths[0]}) | {parts} | "
          f"peak RSS {r['peak_rss_gb']:.1f} GB | turns {r.get('rollout/turns', float('nan')):.2f}")


def run_split(name: str, steps: int) -> dict:
  """The last step's time split of a real run (embedded services, real precompute)."""
  from s3_jax import config_lib, train
  from s3_jax import metrics as metrics_lib

  spec = {"tiny": f"{REPO / 'configs' / 'tiny.py'}:steps={steps}",
          "smollm2": f"{REPO / 'configs' / 'smollm2_wiki.py'}:runlocal"}[name]
  overrides = [] if name == "tiny" else [f"total_steps={steps}", "checkpoint.hf_export_every=0"]
  with tempfile.TemporaryDirectory() as workdir:
    train.main(config_lib.load(spec, overrides), workdir, show_progress=False, log=lambda _: None)
    rows = metrics_lib.read_metrics(workdir)
  return {k: v for k, v in rows[-1].items() if k.startswith("time/")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--window", type=int, default=256)
  parser.add_argument("--micro", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--remat", default="dots", choices=("none", "full", "dots"))
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="compute dtypes of the update (fp32 masters)")
  parser.add_argument("--critics", default="separate",
                      help="separate (s3: a second model) and/or shared (a value head on the actor)")
  parser.add_argument("--runs", default="tiny,smollm2",
                      help="configs whose step time split to measure ('' = none)")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--whole-step", action="store_true", help="whole PPO steps, old vs new paths")
  parser.add_argument("--paths", default="old,new,new-shared", help="--whole-step paths: " +
                      ", ".join(WHOLE_STEP_PATHS))
  parser.add_argument("--questions", type=int, default=16)
  parser.add_argument("--whole-steps", type=int, default=2, help="--whole-step: steps per path, last timed")
  parser.add_argument("--whole-step-child", help=argparse.SUPPRESS)
  parser.add_argument("--repo", type=Path, default=REPO, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.whole_step_child:
    print(json.dumps(whole_step_child(args.whole_step_child, args.questions, args.whole_steps, args.repo)))
    return
  if args.whole_step:
    paths = args.paths.split(",")
    unknown = [p for p in paths if not _known_path(p)]
    if unknown:
      parser.error(f"--paths: unknown {unknown}; known: {', '.join(WHOLE_STEP_PATHS)}, or at:REV (a "
                   "commit's own code and defaults)")
    whole_step(paths, args.questions, args.whole_steps)
    return

  import jax

  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
  peak, shape = matmul_peak()
  print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s (float32, best shape {shape})")
  first = None
  for critic, dtype in [(c, d) for c in args.critics.split(",") for d in args.dtypes.split(",")]:
    r = update_rate(args.batch, args.length, args.window, args.micro, args.repeats, args.remat, dtype, critic)
    first = first or r["seconds"]
    xla_rate, model_rate = r["xla_flops"] / r["seconds"], r["model_flops"] / r["seconds"]
    print(f"update step ({dtype} compute), SmolLM2-135M actor + {critic} critic, "
          f"batch {args.batch} x {args.length} tokens (window {args.window}, micro-batch {args.micro}, "
          f"remat {args.remat}, compiled in {r['compile_s']:.0f} s): "
          f"{r['seconds']:.2f} s ({first / r['seconds']:.2f}x the first row), "
          f"{r['tokens'] / r['seconds']:.0f} tokens/s, XLA temporaries {r['temp_gb']:.2f} GB")
    print(f"  model matmul work {r['model_flops'] / 1e12:.2f} TFLOP (forward + backward, remat recompute not "
          f"counted) -> {model_rate / 1e9:.1f} GFLOP/s = {100 * model_rate / peak:.0f}% of the fp32 matmul "
          f"peak")
    print(f"  (XLA's cost_analysis counts {r['xla_flops'] / 1e12:.2f} TFLOP = {xla_rate / 1e9:.1f} GFLOP/s: "
          f"it counts each lax.scan body once, so it undercounts a layer-scanned, micro-batched step)")
  for name in filter(None, args.runs.split(",")):
    split = run_split(name, args.steps if name == "tiny" else 2)
    total = split.get("time/step", 0.0)
    parts = ", ".join(f"{k[5:]} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in split.items()
                      if k != "time/step")
    print(f"{name}: step {total:.1f} s | {parts}")
  print(json.dumps({"peak_gflops": peak / 1e9, **{k: v for k, v in r.items()}}))


if __name__ == "__main__":
  main()
