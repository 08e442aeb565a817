"""Score + update of a SmolLM2-135M learner on a batch of episodes of different lengths: micro-batches padded
to the whole batch's shape (`ppo.micro_batch_padding=batch`) vs each to its own, rows grouped by length
(`own`, `rl/layout.py`). Same process, same batch and weights; each path is run once to compile, then timed.

  python benchmarks/micro_padding.py [--rows 8] [--shortest 1100] [--longest 2900] [--prompt 1000] [--micro 2]

Rows hold `--shortest` ... `--longest` tokens, evenly spread (a 3-3-3 SmolLM2 episode: a ~1,000-token prompt,
then up to three turns of 64 policy tokens and ~300-700 observation tokens); each trains on everything after
its `--prompt`-token prompt. fp32, a value head on the actor (the laptop learning config), remat `dots`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_batch(rows: int, shortest: int, longest: int, prompt: int, vocab: int) -> dict:
  from s3_jax.search.batch import train_length

  lengths = np.linspace(shortest, longest, rows).round().astype(int)
  np.random.default_rng(0).shuffle(lengths)
  t = train_length(int(lengths.max()))
  width = train_length(int(lengths.max()) - prompt, minimum=64)
  rng = np.random.default_rng(1)
  batch = {"tokens": rng.integers(0, vocab, (rows, t)).astype(np.int32),
           "attention_mask": np.arange(t)[None, :] < lengths[:, None],
           "index": np.minimum(prompt + np.arange(width)[None, :], t - 1).repeat(rows, 0).astype(np.int32),
           "policy_mask": np.zeros((rows, width), bool), "response_mask": np.zeros((rows, width), bool),
           "scores": np.zeros((rows, width), np.float32), "group": np.arange(rows, dtype=np.int32)}
  for i, n in enumerate(lengths - prompt):
    batch["response_mask"][i, :n] = True
    batch["policy_mask"][i, :n] = rng.random(n) < 0.3
    batch["policy_mask"][i, n - 1] = True
    batch["scores"][i, n - 1] = rng.choice([0.0, 1.0])
  return batch, lengths


def run(padding: str, batch: dict, micro: int) -> dict:
  import dataclasses

  import jax
  from flax import nnx

  from s3_jax import assets
  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import read_config
  from s3_jax.rl import update as update_lib

  config, _ = read_config(assets.path("smollm2-135m-instruct"))
  rows = len(batch["tokens"])
  settings = update_lib.PPOSettings(batch_size=rows, mini_batch_size=rows // 2, actor_micro_batch_size=micro,
                                    critic_micro_batch_size=micro, score_micro_batch_size=micro,
                                    separate_critic=False, micro_batch_padding=padding)
  learner = update_lib.PPOLearner(dataclasses.replace(settings), config, remat="dots")
  actor = Decoder(config, rngs=nnx.Rngs(0)).arrays()
  ref = learner.place_ref(actor)
  state = learner.init_state({**actor, "value_head": update_lib.init_value_head(config, jax.random.key(1))})
  times = {}
  for attempt in ("compile", "timed"):
    layout = learner.layout(batch)
    placed = learner.place_batch(batch)
    start = time.perf_counter()
    scored = jax.block_until_ready(learner.score(state, ref, placed, layout))
    score_s = time.perf_counter() - start
    start = time.perf_counter()
    state, metrics = learner.update(state, {**placed, **scored}, layout)
    metrics = jax.device_get(metrics)
    times[attempt] = (score_s, time.perf_counter() - start)
  return {"score": times["timed"][0], "update": times["timed"][1], "first_score": times["compile"][0],
          "first_update": times["compile"][1], "pg_loss": float(metrics["actor/pg_loss"]),
          "layout": layout}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--shortest", type=int, default=1100)
  parser.add_argument("--longest", type=int, default=2900)
  parser.add_argument("--prompt", type=int, default=1000)
  parser.add_argument("--micro", type=int, default=2)
  parser.add_argument("--paths", default="batch,own")
  args = parser.parse_args()
  batch, lengths = make_batch(args.rows, args.shortest, args.longest, args.prompt, 49152)
  print(f"{args.rows} rows of {sorted(lengths.tolist())} tokens, padded batch {batch['tokens'].shape}, "
        f"window {batch['index'].shape[1]}; micro-batches of {args.micro}")
  results = {p: run(p, batch, args.micro) for p in args.paths.split(",")}
  first = next(iter(results.values()))
  for path, r in results.items():
    total, base = r["score"] + r["update"], first["score"] + first["update"]
    print(f"  {path:<5} score {r['score']:7.1f} s, update {r['update']:7.1f} s, together {total:7.1f} s "
          f"({base / total:.2f}x {args.paths.split(',')[0]}) | first call (compiles) "
          f"{r['first_score']:.1f} + "
          f"{r['first_update']:.1f} s | pg_loss {r['pg_loss']:.6f}")
    if r["layout"] is not None:
      print("        score micro-batches (length, width): "
            + ", ".join(f"{mb.length}x{mb.width}" for mb in r["layout"].score))


if __name__ == "__main__":
  main()
