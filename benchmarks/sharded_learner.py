"""The sharded PPO learner's score and update on a mesh of fake CPU devices, with the activations kept
batch-sharded between layers (what the learner does) against the partitioner's own choice (no constraint).

  python benchmarks/sharded_learner.py [--devices 8] [--mesh fsdp=8] [--batch 8] [--length 1536]
                                      [--window 160]

The tiny config's searcher shape (vocab 49,152, hidden 64, 2 layers) with a separate critic and a KL
reference, random weights and tokens, fp32. Without the constraint XLA followed the embedding's sharding
(hidden over fsdp): every device computed every row on a slice of the hidden dimension and all-reduced
activations in each layer and the full window logits [batch, window, vocab]; with it, each device keeps its
rows and all-gathers the weights (FSDP). Prints the median call time of each after a warm-up, their ratio,
and the collectives of the compiled score program.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _mesh_shape(text: str) -> dict[str, int]:
  shape = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in text.split(","):
    name, _, size = part.partition("=")
    if name not in shape or not size.isdigit() or int(size) < 1:
      raise SystemExit(f"--mesh {text!r}: {part!r} must be AXIS=SIZE with AXIS one of data, fsdp, tensor "
                       f"and SIZE a positive integer")
    shape[name] = int(size)
  return shape


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--mesh", default="fsdp=8")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1536)
  parser.add_argument("--window", type=int, default=160)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} " \
                            f"--xla_force_host_platform_device_count={args.devices}".strip()
  sys.path.insert(0, str(REPO))

  import dataclasses

  import jax
  import numpy as np
  from flax import nnx

  from s3_jax import sharding as sharding_lib
  from s3_jax.models import heads
  from s3_jax.models.config import DecoderConfig
  from s3_jax.models.decoder import Decoder, ValueModel
  from s3_jax.rl import learner as learner_lib
  from s3_jax.rl.settings import PPOSettings

  config = DecoderConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, tie_embeddings=True, max_position_embeddings=8192)
  b, t, w = args.batch, args.length, args.window
  settings = PPOSettings(batch_size=b, mini_batch_size=b, actor_micro_batch_size=b,
                                    critic_micro_batch_size=b, score_micro_batch_size=b, kl_coef=0.001)
  mesh = sharding_lib.make_mesh(_mesh_shape(args.mesh))
  rng = np.random.default_rng(0)
  host = {"tokens": rng.integers(0, 1000, (b, t)).astype(np.int32), "attention_mask": np.ones((b, t), bool),
          "index": np.tile(np.arange(t - w, t, dtype=np.int32), (b, 1)),
          "policy_mask": np.ones((b, w), bool), "response_mask": np.ones((b, w), bool),
          "token_scores": rng.normal(size=(b, w)).astype(np.float32), "group": np.arange(b, dtype=np.int32)}

  def measure(constrained: bool) -> tuple[float, float, str]:
    learner = learner_lib.PPOLearner(dataclasses.replace(settings), config, mesh=mesh)
    if not constrained:
      learner._rows = lambda x: x  # the partitioner's own choice
    actor = Decoder(config, rngs=nnx.Rngs(0)).arrays()
    critic = heads.critic_params(ValueModel(config, rngs=nnx.Rngs(1)))
    ref = learner.place_ref(actor)
    state = learner.init_state(actor, critic)
    batch = learner.place_batch(host)
    inputs = {k: batch[k] for k in ("tokens", "attention_mask", "index")}
    hlo = jax.jit(learner._score_fn).lower(state, ref, inputs).compile().as_text()
    ops = re.findall(r"= (.+?) (all-reduce|all-gather|reduce-scatter)\(", hlo)

    def elements(shapes: str) -> int:
      return sum(int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                 for dims in re.findall(r"\w+\[([\d,]*)\]", shapes))

    largest = max(ops, key=lambda op: elements(op[0]))
    summary = (f"{len(ops)} collectives, the largest: {largest[1]} of {elements(largest[0]):,} elements "
               f"({re.sub(r'{[^}]*}', '', largest[0])})")
    score_times, update_times = [], []
    for _ in range(args.repeats + 1):
      start = time.perf_counter()
      scored = jax.block_until_ready(learner.score(state, ref, batch))
      score_times.append(time.perf_counter() - start)
      start = time.perf_counter()
      state, metrics = learner.update(state, {**batch, **scored})
      jax.block_until_ready(metrics)
      update_times.append(time.perf_counter() - start)
    return statistics.median(score_times[1:]), statistics.median(update_times[1:]), summary

  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} CPU devices; batch {b} x {t} tokens, window {w}")
  base_score, base_update, base_ops = measure(False)
  score, update, ops = measure(True)
  print(f"{'':28s} {'score':>8s} {'update':>8s}")
  print(f"{'partitioner (no constraint)':28s} {base_score:7.2f}s {base_update:7.2f}s   {base_ops}")
  print(f"{'rows kept (the learner)':28s} {score:7.2f}s {update:7.2f}s   {ops}")
  print(f"{'speed-up':28s} {base_score / score:7.2f}x {base_update / update:7.2f}x")


if __name__ == "__main__":
  main()
