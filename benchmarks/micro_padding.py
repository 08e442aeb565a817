"""Score + update of a SmolLM2-135M learner on a batch of episodes of different lengths: micro-batches padded
to the whole batch's shape (`ppo.micro_batch_padding=batch`) vs each to its own, rows grouped by length
(`own`, `rl/layout.py`), and `own` with the rows' shared leading tokens computed once (`prefix`,
`ppo.shared_prefix`). Same process, same batch and weights; each path is run once to compile, then timed.

  python benchmarks/micro_padding.py [--rows 8] [--shortest 1100] [--longest 2900] [--prompt 1000] [--micro 2]
      [--mini ROWS/2] [--score-micro MICRO] [--prefix 0] [--remat dots] [--paths batch,own[,prefix]]
      [--repeats 1]

`--prefix N`: every row begins with the same N tokens (s3's instruction template is 651 SmolLM2 tokens).

Rows hold `--shortest` ... `--longest` tokens, evenly spread (a 3-3-3 SmolLM2 episode: a ~1,000-token prompt,
then up to three turns of 64 policy tokens and ~300-700 observation tokens); each trains on everything after
its `--prompt`-token prompt. fp32, a value head on the actor (the laptop learning config), remat `dots`.
"""

from __future__ import annotations

import argparse
import time

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import numpy as np


def make_batch(rows: int, shortest: int, longest: int, prompt: int, vocab: int, prefix: int = 0) -> dict:
  from s3_jax.rl.batch import train_length

  lengths = np.linspace(shortest, longest, rows).round().astype(int)
  np.random.default_rng(0).shuffle(lengths)
  t = train_length(int(lengths.max()))
  width = train_length(int(lengths.max()) - prompt, minimum=64)
  rng = np.random.default_rng(1)
  batch = {"tokens": rng.integers(0, vocab, (rows, t)).astype(np.int32),
           "attention_mask": np.arange(t)[None, :] < lengths[:, None],
           "index": np.minimum(prompt + np.arange(width)[None, :], t - 1).repeat(rows, 0).astype(np.int32),
           "policy_mask": np.zeros((rows, width), bool), "response_mask": np.zeros((rows, width), bool),
           "token_scores": np.zeros((rows, width), np.float32), "group": np.arange(rows, dtype=np.int32)}
  batch["tokens"][:, :prefix] = batch["tokens"][0, :prefix]
  for i, n in enumerate(lengths - prompt):
    batch["response_mask"][i, :n] = True
    batch["policy_mask"][i, :n] = rng.random(n) < 0.3
    batch["policy_mask"][i, n - 1] = True
    batch["token_scores"][i, n - 1] = rng.choice([0.0, 1.0])
  return batch, lengths


def run(path: str, batch: dict, micro: int, mini: int, score_micro: int, remat: str, repeats: int) -> dict:
  import dataclasses

  import jax
  from flax import nnx

  from s3_jax import assets
  from s3_jax.models.decoder import Decoder, init_value_head
  from s3_jax.models.hf import read_config
  from s3_jax.rl import learner as learner_lib
  from s3_jax.rl.settings import PPOSettings

  config, _ = read_config(assets.path("smollm2-135m-instruct"))
  rows = len(batch["tokens"])
  settings = PPOSettings(batch_size=rows, mini_batch_size=mini, actor_micro_batch_size=micro,
                                    critic_micro_batch_size=micro, score_micro_batch_size=score_micro,
                                    separate_critic=False,
                                    micro_batch_padding="batch" if path == "batch" else "own",
                                    shared_prefix=path == "prefix")
  learner = learner_lib.PPOLearner(dataclasses.replace(settings), config, remat=remat)
  actor = Decoder(config, rngs=nnx.Rngs(0)).arrays()
  ref = learner.place_ref(actor)
  state = learner.init_state({**actor, "value_head": init_value_head(config, jax.random.key(1))})
  times = []
  for _ in range(1 + repeats):  # the first call compiles
    layout = learner.layout(batch)
    placed = learner.place_batch(batch)
    start = time.perf_counter()
    scored = jax.block_until_ready(learner.score(state, ref, placed, layout))
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = learner.update(state, {**placed, **scored}, layout)
    metrics = jax.device_get(metrics)
    times.append((score_s, time.perf_counter() - start))
    if len(times) == 1:
      first_metrics = metrics
  timed = times[1:]
  return {"score": float(np.median([t[0] for t in timed])), "update": float(np.median([t[1] for t in timed])),
          "first_score": times[0][0], "first_update": times[0][1],
          "pg_loss": float(first_metrics["actor/pg_loss"]),
          "grad_norm": float(first_metrics["actor/grad_norm"]),
          "layout": layout}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--shortest", type=int, default=1100)
  parser.add_argument("--longest", type=int, default=2900)
  parser.add_argument("--prompt", type=int, default=1000)
  parser.add_argument("--micro", type=int, default=2)
  parser.add_argument("--mini", type=int, default=0, help="minibatch rows (default: half the rows)")
  parser.add_argument("--score-micro", type=int, default=0, help="score micro-batch rows (default: --micro)")
  parser.add_argument("--prefix", type=int, default=0, help="leading tokens every row shares")
  parser.add_argument("--remat", choices=("dots", "full"), default="dots")
  parser.add_argument("--repeats", type=int, default=1, help="timed calls after the compiling one (median)")
  parser.add_argument("--paths", default="batch,own")
  args = parser.parse_args()
  unknown = set(args.paths.split(",")) - {"batch", "own", "prefix"}
  if unknown:
    parser.error(f"--paths: unknown {sorted(unknown)} (batch, own, prefix)")
  if "prefix" in args.paths.split(",") and args.prefix < 64:
    parser.error("--paths prefix needs --prefix of at least 64 shared tokens (layout.PREFIX_MULTIPLE)")
  batch, lengths = make_batch(args.rows, args.shortest, args.longest, args.prompt, 49152, args.prefix)
  mini, score_micro = args.mini or args.rows // 2, args.score_micro or args.micro
  print(f"{args.rows} rows of {sorted(lengths.tolist())} tokens, padded batch {batch['tokens'].shape}, "
        f"window {batch['index'].shape[1]}, {args.prefix} shared leading tokens; minibatches of {mini}, "
        f"micro-batches of {args.micro} (score {score_micro}), remat {args.remat}", flush=True)
  results = {p: run(p, batch, args.micro, mini, score_micro, args.remat, args.repeats)
             for p in args.paths.split(",")}
  first = next(iter(results.values()))
  for path, r in results.items():
    total, base = r["score"] + r["update"], first["score"] + first["update"]
    print(f"  {path:<5} score {r['score']:7.1f} s, update {r['update']:7.1f} s, together {total:7.1f} s "
          f"({base / total:.2f}x {args.paths.split(',')[0]}) | first call (compiles) "
          f"{r['first_score']:.1f} + "
          f"{r['first_update']:.1f} s | pg_loss {r['pg_loss']:.6f}, grad_norm {r['grad_norm']:.6f}")
    if r["layout"] is not None:
      print("        score micro-batches (length, width): "
            + ", ".join(f"{mb.length}x{mb.width}" for mb in r["layout"].score)
            + f"; shared prefix {r['layout'].prefix}")


if __name__ == "__main__":
  main()
