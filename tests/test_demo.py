"""`make demo` (`python -m s3_jax.demo`): the learning config's short run, then naive RAG and the searcher
before and after it on the same held-out questions, a results page and curves — here at tiny sizes (the
random tiny searcher, 1 step, 2 questions)."""

import pytest
from conftest import REPO

from s3_jax import config_lib, demo, results

CONFIG = f"{REPO / 'configs' / 'smollm2_wiki.py'}:learn,demo"


def test_the_demo_config_is_a_short_learn_run():
  config = config_lib.load(CONFIG)
  learn = config_lib.load(f"{REPO / 'configs' / 'smollm2_wiki.py'}:learn")
  assert (config.total_steps, config.ppo.batch_size, config.rollout.max_turns, config.evaluate.sample) == (
      2, 8, 1, 8)
  assert config.checkpoint.hf_export_every == config.total_steps  # the trained row needs the final export
  for key in ("data.train", "data.test", "retriever.kind", "critic.separate_model", "ppo.actor_lr"):
    assert config_lib.flatten(config.to_dict())[key] == config_lib.flatten(learn.to_dict())[key]
  with pytest.raises(ValueError, match="use learn,demo"):
    config_lib.load(f"{REPO / 'configs' / 'smollm2_wiki.py'}:demo")


@pytest.mark.slow
@pytest.mark.late(seconds=150)
def test_the_demo_trains_evaluates_three_rows_and_writes_the_page(tmp_path, asset):
  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-trivia"):
    asset(name)
  config = config_lib.load(CONFIG, [
      "total_steps=1", "checkpoint.every=1", "checkpoint.hf_export_every=1", "searcher.init_from=",
      "mesh.fsdp=2",
      "data.train_limit=8", "data.corpus_limit=2000", "ppo.batch_size=2", "ppo.mini_batch_size=2",
      "ppo.score_micro_batch_size=2", "rollout.max_response_length=24", "rollout.max_prompt_length=2048",
      "rollout.max_obs_length=256", "generator.max_tokens=8", "reward.use_judge=False",
      "evaluate.sample=2"])
  page, caveat = demo.run(config, tmp_path, log=lambda _: None)
  rows = results.load_rows(tmp_path)
  assert list(rows) == ["rag", "untrained", "trained"] and rows["trained"]["questions"] == 2
  for row in ("rag", "untrained", "trained"):
    assert f"| {results.ROWS[row]} | 2 | 1 |" in page
  assert (tmp_path / "results.md").read_text() == page
  assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
  assert (tmp_path / "train" / "hf" / "step_1").is_dir()
  assert "cannot show: learning" in caveat and "2 held-out questions" in caveat
