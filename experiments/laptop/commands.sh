#!/usr/bin/env bash
# The laptop learning experiment (issue 19): every command that produced experiments/laptop/, in order.
# Run from the repository root after `make assets`. Each step resumes when rerun (sft and probe rerun whole).
set -euo pipefail
E=experiments/laptop
C=configs/smollm2_wiki.py:learn
# The naive-RAG precompute lives in the experiment (its JSONL files are committed; answers.sqlite is not), so a
# later session reuses it instead of recomputing it.
P=--config.precompute.dir=$E/precompute
# Steps 0-2 and the held-out rows (step 4) score answers as s3 does: the span check, else the LLM judge
# (--config.reward.use_judge=True). Training (step 3) rewards the span check alone, the learn config's
# reward.use_judge=False: the only judge offline is the 135M generator, whose "yes" was mostly wrong
# (tries/judged_reward/seed0/note.md). Its naive-RAG baseline and filter are scored the same way: PT.
J=--config.reward.use_judge=True
PT=--config.precompute.dir=$E/precompute_span

# 0. s3's naive-RAG baseline of the 448 training questions and its filter (cached; the trainer would run it).
python -m s3_jax.precompute --config $C $P $J --config.precompute.splits=train
python -m s3_jax.precompute --config $C $PT --config.precompute.splits=train

# 1. The format warm start: 64 mechanically scripted protocol traces (keyword queries, selections by rank,
#    no answers), 1 epoch, AdamW 1e-5 (s3_jax/sft.py).
python -m s3_jax.sft --config $C $P $J --out $E/sft --questions 64 --epochs 1 --lr 1e-5 --micro 2 --seed 0

# 2. What PPO would see at step 1, untrained vs warm start: 32 filtered training questions that the warm start
#    did not trace, the training reward, no update (s3_jax/probe.py).
python -m s3_jax.probe --config $C $P $J --questions 32 --skip 64 --out $E/probe/untrained.json
python -m s3_jax.probe --config $C $P $J --questions 32 --skip 64 --init $E/sft --out $E/probe/warm_start.json

# 3. Training, 3 seeds (the seed sets the value head's init and the rollout's RNG; the data order is the
#    same: data.shuffle_seed), from the warm start; a checkpoint every step, so rerunning resumes.
#    Code: seed 0 ran s3_jax at fa611ee, seeds 1-2 at 597d29b (the same computation; 597d29b adds the
#    per-step episode files train/seedS/rollouts/ and the reward/nonzero metric).
for S in 0 1 2; do
  python -m s3_jax.train --config $C $PT --config.seed=$S --config.searcher.init_from=$E/sft --workdir $E/train/seed$S
done

# 4. Evaluation on the held-out trivia test split: the same 100 questions (evaluate.sample=100, seed 42) for
#    every row, the same generator, retriever and scoring (s3_jax/evaluate.py; each resumes when rerun).
EV="--config.evaluate.sample=100 $J"
python -m s3_jax.evaluate --config $C $P $EV --method none --out $E/eval/closed_book
python -m s3_jax.evaluate --config $C $P $EV --method rag --out $E/eval/rag
python -m s3_jax.evaluate --config $C $P $EV --method s3 --out $E/eval/untrained
python -m s3_jax.evaluate --config $C $P $EV --method s3 --checkpoint $E/sft --out $E/eval/warm_start
for S in 0 1 2; do
  python -m s3_jax.evaluate --config $C $P $EV --method s3 --checkpoint $E/train/seed$S --out $E/eval/trained/seed$S
done

# 5. The results page and curves, from the outputs alone.
python -m s3_jax.results $E

# 6. Tries (recorded under tries/NAME/seedS, shown on the page apart from the table): one seed with some settings
#    changed, trained from the same warm start and evaluated like the table's rows (experiments/laptop/try.sh).
#    Each try's commands.log holds its exact command and code commit.
