"""The training set a PPO run iterates: s3's filtered questions, their naive-RAG results (the initial
document block and the RAG-cache score the reward compares against), in a seeded, resumable order.

The order is a pure function of (seed, step): epoch `e` is a permutation drawn from `rng(seed, e)`, batches
are consecutive slices of it, and a short last batch is dropped (s3: shuffled loader, `drop_last=True`). So
resuming needs only the step; the checkpoint stores the position anyway to check it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from s3_jax.data.corpus import Doc
from s3_jax.data.qa import QAExample, read_qa
from s3_jax.reward.gbr import RagCache


@dataclasses.dataclass
class TrainingData:
  examples: list[QAExample]
  retrieved: dict[tuple[str, str], list[Doc]]  # (data_source, question) -> naive-RAG top docs
  rag_cache: RagCache
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if len(self.examples) < self.batch_size:
      raise ValueError(f"{len(self.examples)} training questions after s3's filter, fewer than one batch "
                       f"of ppo.batch_size={self.batch_size}: use more questions (data.train_limit) or a "
                       f"smaller batch")
    if self.batch_size % self.process_count:
      raise ValueError(f"ppo.batch_size={self.batch_size} is not divisible by {self.process_count} processes")
    missing = [ex.question for ex in self.examples if (ex.data_source, ex.question) not in self.retrieved]
    if missing:
      raise KeyError(f"{len(missing)} training questions have no naive-RAG retrieval "
                     f"(first: {missing[0]!r}); rerun python -m s3_jax.precompute")

  @property
  def batches_per_epoch(self) -> int:
    return len(self.examples) // self.batch_size

  def position(self, step: int) -> dict[str, int]:
    """Where batch `step` (0-based) comes from: `{"epoch", "batch"}`."""
    return {"epoch": step // self.batches_per_epoch, "batch": step % self.batches_per_epoch}

  def batch(self, step: int) -> tuple[list[QAExample], list[list[Doc]]]:
    """This process's share of batch `step`: its questions and their naive-RAG docs (best first). Shares are
    contiguous blocks in process order, as `make_array_from_process_local_data` lays rows out, so the
    global batch is the same whatever the number of processes."""
    where = self.position(step)
    order = np.random.default_rng([self.seed, where["epoch"]]).permutation(len(self.examples))
    rows = order[where["batch"] * self.batch_size:(where["batch"] + 1) * self.batch_size]
    share = self.batch_size // self.process_count
    rows = rows[self.process_index * share:(self.process_index + 1) * share]
    examples = [self.examples[i] for i in rows]
    return examples, [self.retrieved[(ex.data_source, ex.question)] for ex in examples]


def load_training_data(precompute_dir: str | Path, *, batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1) -> TrainingData:
  """Reads a finished precompute folder (`python -m s3_jax.precompute`)."""
  folder = Path(precompute_dir)
  for name in ("train_filtered.jsonl", "retrieval_train.jsonl", "rag_cache.json"):
    if not (folder / name).is_file():
      raise FileNotFoundError(f"{folder}: no {name}; run python -m s3_jax.precompute with this config "
                              f"(the trainer runs it when the folder is missing)")
  retrieved: dict[tuple[str, str], list[Doc]] = {}
  with open(folder / "retrieval_train.jsonl", encoding="utf-8") as f:
    for line in f:
      if line.strip():
        row: dict[str, Any] = json.loads(line)
        retrieved[(row["data_source"], row["question"])] = [
            Doc(str(d["id"]), d["title"], d["text"], None if d.get("score") is None else float(d["score"]))
            for d in row["docs"]]
  examples = read_qa(folder / "train_filtered.jsonl")
  return TrainingData(examples, retrieved, RagCache.load(folder / "rag_cache.json"), batch_size, seed,
                      process_index, process_count)
