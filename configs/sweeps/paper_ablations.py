"""The s3 paper's ablations as sweep runs: experiment content shared by the config files' `sweep(add)`.

  ABLATIONS = config_lib.load_module(Path(__file__).parent / "sweeps/paper_ablations.py")
  def sweep(add):
    ABLATIONS.add_runs(add, grpo_batch_size=..., grpo_mini_batch_size=...)
"""

from collections.abc import Callable


def add_runs(add: Callable[..., None], *, grpo_batch_size: int, grpo_mini_batch_size: int) -> None:
  """The paper's ablations as sweep runs, for a config file's `sweep(add)`: Table 5, the reward used for
  training; Table 6, w/o selection and w/o begin-with-search; Table 3, the retrieval / turns grid (top-k ×
  turns; 8-3-3 is the base); and GRPO (4 samples per question, in batches of `grpo_batch_size` questions)
  instead of PPO."""
  add(name="base")
  for kind in ("code", "genacc", "em"):
    add(**{"reward.kind": kind})
  add(**{"rollout.selection": False})
  add(**{"rollout.begin_with_search": False})
  for topk in (3, 5, 8):
    for turns in (3, 4):
      if (topk, turns) != (8, 3):
        add(**{"rollout.topk": topk, "rollout.max_turns": turns})
  add(name="grpo", **{"ppo.adv_estimator": "grpo", "rollout.samples_per_question": 4,
                      "ppo.batch_size": grpo_batch_size, "ppo.mini_batch_size": grpo_mini_batch_size})
