"""`python -m s3_jax.results` on a small experiment written here: the table's numbers against sums done in the
test, the refusal to compare rows over different questions, the curves PNG and the page's parts."""

import json
import statistics

import numpy as np
import pytest

from s3_jax import results

QUESTIONS = [("trivia", f"q{i}") for i in range(10)]


def _predictions(folder, correct, *, questions=QUESTIONS, queries=("a query",)):
  """`correct`: the question indices whose answer is right (GenAcc 1; EM 1 for the even ones)."""
  folder.mkdir(parents=True)
  with open(folder / "predictions.jsonl", "w") as f:
    for i, (source, qid) in enumerate(questions):
      ok = i in correct
      f.write(json.dumps({
          "data_source": source, "id": qid, "run": 0, "question": f"question {qid}?", "golden_answers": ["x"],
          "answer": "x" if ok else "y", "scores": {"genacc": float(ok), "em": float(ok and i % 2 == 0),
                                                   "span": float(ok), "judge": None, "f1": float(ok)},
          "trace": {"queries": list(queries), "docs_selected": 2, "turns": 2}}) + "\n")


def _metrics(folder, steps, reward):
  folder.mkdir(parents=True)
  with open(folder / "metrics.jsonl", "w") as f:
    for step in range(1, steps + 1):
      f.write(json.dumps({"step": step, "reward/mean": reward * step, "reward/kl": 0.01 * step,
                          "rollout/invalid_action_rate": 0.5 / step, "time/step": 600.0}) + "\n")


def _experiment(tmp_path):
  exp = tmp_path / "learn"
  _predictions(exp / "eval" / "closed_book", {0})
  _predictions(exp / "eval" / "rag", {0, 1, 2})
  for seed, (untrained, trained) in enumerate([({0, 1}, {0, 1, 2, 3, 4}), ({1}, {0, 1, 2, 3, 4, 5}),
                                               ({0, 1, 2}, {0, 1, 2, 3, 4, 5, 6})]):
    _predictions(exp / "eval" / "untrained" / f"seed{seed}", untrained)
    _predictions(exp / "eval" / "warm_start" / f"seed{seed}", untrained | {3})
    _predictions(exp / "eval" / "trained" / f"seed{seed}", trained, queries=(f"better query {seed}",))
    _metrics(exp / "train" / f"seed{seed}", 3, 0.1 * (seed + 1))
  for name, nonzero in (("untrained", 1), ("warm_start", 5)):
    (exp / "probe").mkdir(exist_ok=True)
    (exp / "probe" / f"{name}.json").write_text(json.dumps({
        "questions": 32, "skip": 64, "seed": 0, "data": "asset:qa-trivia/train.jsonl", "metrics": {
            "probe/episodes": 32, "probe/nonzero_reward": nonzero, "reward/mean": nonzero / 32,
            "reward/genacc": nonzero / 32, "probe/episodes_with_a_search": 2 * nonzero,
            "rollout/searches": 0.5, "probe/placeholder_queries": 1, "probe/queries": 16,
            "rollout/docs_selected": 1.0, "rollout/invalid_action_rate": 0.25,
            "rollout/ended_by_completion": 0.5, "probe/answer_in_top12": 12, "probe/oracle_genacc": 0.2}}))
  (exp / "commands.sh").write_text("python -m s3_jax.train --config configs/smollm2_wiki.py:learn\n")
  (exp / "machine.txt").write_text("2 cores, 23 GiB\n")
  _metrics(exp / "tries" / "lr_high" / "seed0", 2, 0.5)
  _metrics(exp / "tries" / "slow_head" / "seed0", 3, 0.1)
  (exp / "tries" / "slow_head" / "seed0" / "note.md").write_text("Replaced: the head never learned.\n")
  _predictions(exp / "tries" / "slow_head" / "seed0" / "eval", {0, 1, 2, 3})
  (exp / "eval" / "rag" / "timing.json").write_text(json.dumps({"questions": 10, "seconds": 150.0}))
  return exp


def test_page_numbers_verdict_curves_and_episodes(tmp_path):
  exp = _experiment(tmp_path)
  page = results.write_page(exp, exp / "results.md", exp / "curves.png", episode_count=2)
  trained = [0.5, 0.6, 0.7]  # 5, 6, 7 of 10 right
  mean, std = statistics.fmean(trained), float(np.std(trained, ddof=1))
  assert f"| {results.ROWS['trained']} | 10 | 3 | {100 * mean:.1f} ± {100 * std:.1f} |" in page
  em = [3 / 10, 3 / 10, 4 / 10]  # even indices among the right ones
  assert f"{100 * statistics.fmean(em):.1f} ± {100 * float(np.std(em, ddof=1)):.1f}" in page
  assert f"| {results.ROWS['rag']} | 10 | 1 | 30.0 | 20.0 | one run 30.0 |" in page
  untrained = statistics.fmean([0.2, 0.1, 0.3])
  margin = mean - 0.3 - 2 * std  # 0.6 - 0.3 - 0.2 = +0.1: met
  assert (f"trained − naive RAG = +30.0 points against 2 × std = {200 * std:.1f}: **met** "
          f"({100 * margin:+.1f}") in page
  assert f"trained − untrained = {100 * (mean - untrained):+.1f} points: **above**" in page
  start = statistics.fmean([0.3, 0.2, 0.4])  # the untrained rows with question 3 right as well
  assert f"trained − warm start = {100 * (mean - start):+.1f} points (what RL added)" in page
  assert page.index(results.ROWS["closed_book"]) < page.index(results.ROWS["rag"]) < page.index(
      results.ROWS["untrained"]) < page.index(results.ROWS["warm_start"]) < page.index(
      results.ROWS["trained"])
  assert "better query 0" in page and "question q0?" in page and "question q1?" in page
  assert "question q2?" not in page  # two episodes asked for
  assert "python -m s3_jax.train --config configs/smollm2_wiki.py:learn" in page
  assert "| | untrained | warm_start |" in page
  assert "| episodes with a nonzero reward | 1 / 32 | 5 / 32 |" in page
  assert "| reward (GBR), mean | 0.031 | 0.156 |" in page
  assert "32 filtered training questions of `asset:qa-trivia/train.jsonl` (the first 64" in page
  assert (exp / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "- seed0: 3 steps, 0.50 h of steps" in page
  assert "`tries/lr_high/seed0`: 2 step(s)" in page
  assert "| 2 | 1.000 | – | – | – | – | 0.020 | – |" in page  # reward 0.5 x step 2, KL 0.01 x step 2
  assert "`tries/slow_head/seed0`: 3 step(s)\n\nReplaced: the head never learned." in page
  # 4 of 10 right; EM on the even ones among them (0, 2)
  assert "Held-out evaluation of its last step: GenAcc 40.0, EM 20.0 on 10 questions." in page
  # question by question against the table's rows: right on 0-3 against RAG's 0-2 (+10: question 3 only),
  # against the warm start's seeds (0,1,3 / 1,3 / 0,1,2,3: per question 2/3, 1, 1/3, 1) and the untrained's
  try_vs_rag = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0]
  half = 1.96 * statistics.stdev(try_vs_rag) / np.sqrt(10)
  assert ("Question by question (GenAcc; ± a 95% interval over the 10 questions): slow_head seed0 − naive "
          f"RAG = +10.0 ± {100 * half:.1f} points (better on 1 questions, worse on 0); slow_head seed0 − "
          "warm start = ") in page
  vs_start = [1 / 3, 0, 2 / 3, 0, 0, 0, 0, 0, 0, 0]
  half = 1.96 * statistics.stdev(vs_start) / np.sqrt(10)
  assert (f"slow_head seed0 − warm start = {100 * statistics.fmean(vs_start):+.1f} ± {100 * half:.1f} points "
          "(better on 2 questions, worse on 0)") in page
  assert "- machine: 2 cores, 23 GiB" in page and "- evaluation rag: 10 questions in 2.5 min" in page


def test_paired_differences_over_questions(tmp_path):
  """Each question's score averaged over seeds, minus the other row's: the mean, a 95% interval of 1.96
  standard errors, and the questions that went each way."""
  exp = _experiment(tmp_path)
  page = results.write_page(exp, exp / "results.md", exp / "curves.png", episode_count=0)
  # trained seeds right on 0-4, 0-5, 0-6: per question 1 (0-4), 2/3 (5), 1/3 (6), 0 (7-9); RAG right on 0-2
  diffs = [0, 0, 0, 1, 1, 2 / 3, 1 / 3, 0, 0, 0]
  half = 1.96 * statistics.stdev(diffs) / np.sqrt(10)
  assert (f"(GenAcc, each question's score averaged over seeds; ± a 95% interval over the 10 questions): "
          f"trained − naive RAG = +30.0 ± {100 * half:.1f} points (better on 4 questions, worse on 0)"
          ) in page
  # warm start seeds: {0, 1, 3}, {1, 3}, {0, 1, 2, 3}: per question 2/3, 1, 1/3, 1, then 0
  diffs = [1 - 2 / 3, 0, 1 - 1 / 3, 0, 1, 2 / 3, 1 / 3, 0, 0, 0]
  half = 1.96 * statistics.stdev(diffs) / np.sqrt(10)
  assert (f"trained − warm start = {100 * statistics.fmean(diffs):+.1f} ± {100 * half:.1f} points "
          "(better on 5 questions, worse on 0)") in page


def test_the_span_check_and_the_judge_only_part_are_shown_beside_genacc(tmp_path):
  """GenAcc that a judge's yes alone made right (the span check failed) shows in the judge-only column, the
  span column is GenAcc without it, and the bar is also read on the span check."""
  exp = _experiment(tmp_path)
  # trained seed0: questions 0-4 right (seed0 of the fixture), two of them (0, 1) by the judge alone
  path = exp / "eval" / "trained" / "seed0" / "predictions.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  for r in rows[:2]:
    r["scores"].update(span=0.0, judge=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  page = results.write_page(exp, exp / "results.md", exp / "curves.png", episode_count=0)
  span = statistics.fmean([0.3, 0.6, 0.7])  # seed0 3 of 10 by the span check; seeds 1, 2 unchanged
  judge_only = statistics.fmean([0.2, 0.0, 0.0])
  line = next(x for x in page.splitlines() if x.startswith(f"| {results.ROWS['trained']} |"))
  assert line.endswith(f"| {100 * span:.1f} ± {100 * float(np.std([0.3, 0.6, 0.7], ddof=1)):.1f} "
                       f"| {100 * judge_only:.1f} ± {100 * float(np.std([0.2, 0.0, 0.0], ddof=1)):.1f} |")
  assert f"| {results.ROWS['rag']} | 10 | 1 | 30.0 | 20.0 | one run 30.0 | 30.0 | 0.0 |" in page
  assert f"On the span check alone (no judge): trained − naive RAG = {100 * (span - 0.3):+.1f} points" in page


def test_not_met_when_the_gain_is_within_the_seeds_spread(tmp_path):
  exp = tmp_path / "learn"
  _predictions(exp / "eval" / "rag", {0, 1, 2, 3, 4})
  for seed, trained in enumerate([{0, 1, 2, 3, 4, 5}, {0, 1, 2, 3}, {0, 1, 2, 3, 4, 5, 6, 7}]):
    _predictions(exp / "eval" / "trained" / f"seed{seed}", trained)
    _metrics(exp / "train" / f"seed{seed}", 2, 0.1)
  page = results.write_page(exp, exp / "results.md", exp / "curves.png")
  assert "**not met**" in page  # mean 0.6 - 0.5 = +10 points, 2 x std = 40 points


def test_rows_over_different_questions_are_refused(tmp_path):
  exp = _experiment(tmp_path)
  other = tmp_path / "other"
  _predictions(other, {0}, questions=[*QUESTIONS[:9], ("trivia", "q99")])
  (exp / "eval" / "rag" / "predictions.jsonl").write_text((other / "predictions.jsonl").read_text())
  with pytest.raises(ValueError, match=r"eval/rag: 10 questions, 2 of them not shared with .*closed_book"):
    results.load_rows(exp)


def test_an_evaluation_under_way_is_left_out_and_named(tmp_path):
  exp = _experiment(tmp_path)
  partial = exp / "eval" / "untrained" / "seed1" / "predictions.jsonl"
  partial.write_text("".join(partial.read_text().splitlines(keepends=True)[:5]))  # 5 of 10 questions so far
  with pytest.raises(ValueError, match="seed1: 5 of the questions evaluated: an evaluation under way"):
    results.load_rows(exp)
  page = results.write_page(exp, exp / "results.md", exp / "curves.png", episode_count=0)
  assert "Not in the table yet (evaluations under way): untrained seed1 (5 questions so far)." in page
  untrained = statistics.fmean([0.2, 0.3])  # seeds 0 and 2 only
  assert f"| {results.ROWS['untrained']} | 10 | 2 | {100 * untrained:.1f} ± " in page


def test_a_page_before_any_training_says_so_and_errors_name_what_is_missing(tmp_path, capsys):
  exp = tmp_path / "learn"
  _predictions(exp / "eval" / "rag", {0})
  _predictions(exp / "eval" / "untrained", {0, 1})
  assert results.main([str(exp)]) == 0  # an experiment under way: the rows so far, no verdict
  page = capsys.readouterr().out
  assert f"| {results.ROWS['rag']} | 10 | 1 | 10.0 |" in page
  assert "No trained searcher evaluated yet: the bar cannot be judged." in page
  assert "No training run yet." in page and "curves.png" not in page
  (exp / "train" / "seed0").mkdir(parents=True)  # a run that has begun, no step done: named, not plotted
  _metrics(exp / "train" / "seed1", 2, 0.1)
  assert results.main([str(exp)]) == 0
  page = capsys.readouterr().out
  assert "- seed0: under way, no step finished yet" in page and "- seed1: 2 steps" in page
  assert (exp / "curves.png").is_file()
  with pytest.raises(FileNotFoundError, match="eval/trained: the trained searcher's evaluation is missing"):
    results.load_rows(exp)
  (exp / "train" / "seed0").rmdir()
  (exp / "train" / "seed1" / "metrics.jsonl").unlink()
  (exp / "train" / "seed1" / "x").write_text("")
  (exp / "train" / "seed1").rename(exp / "train" / "other")
  assert results.main([str(exp)]) == 1
  assert "train: neither outputs" in capsys.readouterr().err


def test_the_training_signal_counts_rewarded_episodes_per_seed(tmp_path):
  """The per-seed signal table: rewarded episodes from `reward/nonzero` x episodes a step (config.json), or,
  for runs from before that metric, from GenAcc where naive RAG's GenAcc was 0 (then GBR != 0 exactly when
  the answer is right); '–' where neither says."""
  exp = tmp_path / "learn"
  runs = {"seed0": [{"reward/nonzero": 0.125}, {"reward/nonzero": 0.0625}],  # 2 and 1 of 16
          "seed1": [{"reward/genacc": 0.25, "reward/rag_genacc": 0.0},
                    {"reward/genacc": 0.0, "reward/rag_genacc": 0.0}],
          "seed2": [{"reward/genacc": 0.25, "reward/rag_genacc": 0.5}]}  # GBR can be -1, 0, 1 here: unknown
  steps = {}
  for label, rows in runs.items():
    (exp / "train" / label).mkdir(parents=True)
    (exp / "train" / label / "config.json").write_text(json.dumps(
        {"ppo": {"batch_size": 8}, "rollout": {"samples_per_question": 2}}))
    steps[label] = [{"step": i + 1, "rollout/searches": 1.0 - 0.5 * i, "actor/entropy": 0.1,
                     "reward/kl": 0.002, "critic/explained_variance": 0.5, **row}
                    for i, row in enumerate(rows)]
  table = results.training_signal(exp, steps)
  assert "| seed0 | 2 | 32 | 3 (2, 1 by step) | – | 1.00 → 0.50 |" in table
  assert "| seed1 | 2 | 32 | 4 (4, 0 by step) |" in table
  assert "| seed2 | 1 | 16 | – |" in table


def test_answer_sources_split_right_answers_by_whether_the_context_holds_a_gold_answer(tmp_path):
  """Per row: the share of questions whose context contains a gold answer (span match after s3's
  normalisation), the span-right share among those, and span-right answers among the rest (of 100), averaged
  over seeds; a closed-book row has no context."""
  def rows(contexts_and_right):
    return [{"data_source": "trivia", "id": f"q{i}", "run": 0, "golden_answers": ["Paris"],
             "context": context, "scores": {"span": right}}
            for i, (context, right) in enumerate(contexts_and_right)]

  gold, other = "Doc 1 (Title: France)\nThe capital is PARIS.", "Doc 1 (Title: Spain)\nMadrid."
  data = {
      "closed_book": {"predictions": {"": rows([("", True), ("", False), ("", False), ("", False)])}},
      "trained": {"predictions": {
          "seed0": rows([(gold, True), (gold, False), (other, True), (other, False)]),  # 50%, 50%, 1 of 4
          "seed1": rows([(gold, True), (gold, True), (gold, True), (other, False)])}},  # 75%, 100%, 0 of 4
  }
  table = results.answer_sources(data)
  assert f"| {results.ROWS['closed_book']} | 0.0% | – | 25.0 of 100 |" in table
  assert f"| {results.ROWS['trained']} | 62.5% | 75.0% | 12.5 of 100 |" in table


def test_rewards_by_search_counts_saved_episodes_with_and_without_a_search(tmp_path):
  exp = tmp_path / "learn"
  rollouts = exp / "train" / "seed0" / "rollouts"
  rollouts.mkdir(parents=True)
  # step 1: 3 episodes without a search (1 rewarded), 1 with (rewarded); step 2: 1 without (not), 1 with (not)
  steps = {1: [(0, 1.0), (0, 0.0), (0, 0.0), (2, 1.0)], 2: [(0, 0.0), (1, 0.0)]}
  # the generator's documents: naive RAG's 3 (any order) for the rewarded episode without a search and for
  # two unrewarded ones; the rewarded search found a document of its own
  rag = ["A", "B", "C"]
  docs = {(1, 0): ["C", "A", "B"], (1, 1): rag, (1, 2): ["A", "B"], (1, 3): ["A", "B", "D"], (2, 0): rag,
          (2, 1): ["A", "B", "C", "D"]}
  for step, episodes in steps.items():
    (rollouts / f"step_{step}.jsonl").write_text("".join(
        json.dumps({"step": step, "searches": searches, "reward": reward, "data_source": "trivia",
                    "question": f"q{step}-{i}", "generator_docs": docs[step, i]}) + "\n"
        for i, (searches, reward) in enumerate(episodes)))
  (exp / "train" / "seed1").mkdir(parents=True)  # no saved episodes: no row
  # without the run's config (and its precompute), the last two columns are unknown
  assert "| seed0 | 2 | 1 / 4 (25.0%) | 1 / 2 (50.0%) | – | – |" in results.rewards_by_search(exp)
  pre = tmp_path / "pre"
  pre.mkdir()
  (pre / "retrieval_train.jsonl").write_text("".join(
      json.dumps({"data_source": "trivia", "question": f"q{step}-{i}",
                  "docs": [{"title": t} for t in [*rag, "E"]]}) + "\n"
      for step, episodes in steps.items() for i in range(len(episodes))))
  (exp / "train" / "seed0" / "config.json").write_text(json.dumps(
      {"precompute": {"dir": str(pre), "context_docs": 3}}))
  table = results.rewards_by_search(exp)
  assert "| seed0 | 2 | 1 / 4 (25.0%) | 1 / 2 (50.0%) | 3 / 6 | 1 / 2 |" in table
  assert "seed1" not in table
  # a try that saved its episodes gets its own row, after the seeds
  tried = exp / "tries" / "d_s3" / "seed0"
  (tried / "rollouts").mkdir(parents=True)
  (tried / "rollouts" / "step_1.jsonl").write_text((rollouts / "step_2.jsonl").read_text())
  (tried / "config.json").write_text((exp / "train" / "seed0" / "config.json").read_text())
  table = results.rewards_by_search(exp)
  assert "| try `d_s3` seed0 | 1 | 0 / 1 (0.0%) | 0 / 1 (0.0%) | 1 / 2 | 0 / 0 |" in table
  assert table.index("| seed0 |") < table.index("| try `d_s3` seed0 |")
  (tried / "rollouts" / "step_1.jsonl").unlink()
  (tried / "rollouts").rmdir()
  # an episode whose question the precompute lacks is an error, not a silent miss
  (pre / "retrieval_train.jsonl").write_text("")
  with pytest.raises(ValueError, match="q1-0"):
    results.rewards_by_search(exp)
  (exp / "train" / "seed0" / "rollouts" / "step_1.jsonl").unlink()
  (exp / "train" / "seed0" / "rollouts" / "step_2.jsonl").unlink()
  assert results.rewards_by_search(exp) == ""
