#!/usr/bin/env bash
# Runs experiments/laptop/commands.sh's steps in the background, one after another, each logged to
# experiments/laptop/logs/: the precompute, the warm start, the probes, the evaluation rows that need no
# training (closed-book, RAG, untrained, warm start), then training and evaluation of the seeds given (none by
# default). Rerunning resumes: finished sft/probe outputs are kept (delete them to redo), evaluations and
# training resume where they stopped (a training checkpoint only within a session: checkpoints are not
# committed).
#   nohup experiments/laptop/background.sh [SEED ...] > /dev/null 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
E=experiments/laptop
C=configs/smollm2_wiki.py:learn
# The naive-RAG precompute lives in the experiment (its JSONL files are committed; answers.sqlite is not), so a
# later session reuses it instead of recomputing it.
P=--config.precompute.dir=$E/precompute
# Training rewards the span check alone (the learn config's reward.use_judge=False) over its own naive-RAG
# precompute; everything else scores as s3 does, span or judge (commands.sh says why).
J=--config.reward.use_judge=True
PT=--config.precompute.dir=$E/precompute_span
PY=${PY:-.venv/bin/python}
L=$E/logs
mkdir -p "$L"
# the machine, one line, for the results page (s3_jax/results.py reads machine.txt)
echo "$(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB," \
  "$(uname -sr), $($PY -c 'import jax, sys; print(f"Python {sys.version.split()[0]}, jax {jax.__version__}")')" \
  > $E/machine.txt
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
run() {  # name, command...: logs the command, its output and its wall time
  local name=$1; shift
  echo "[$(stamp)] start $name: $*" >> "$L/background.log"
  local t0=$SECONDS
  "$@" >> "$L/$name.log" 2>&1
  echo "[$(stamp)] done $name in $((SECONDS - t0)) s" >> "$L/background.log"
}
run precompute $PY -m s3_jax.precompute --config $C $P $J --config.precompute.splits=train
run precompute_span $PY -m s3_jax.precompute --config $C $PT --config.precompute.splits=train
[ -f $E/sft/model.safetensors ] || run sft $PY -m s3_jax.sft --config $C $P $J --out $E/sft --questions 64 --epochs 1 \
  --lr 1e-5 --micro 2 --seed 0
mkdir -p $E/probe
[ -f $E/probe/untrained.json ] || run probe_untrained $PY -m s3_jax.probe --config $C $P $J --questions 32 --skip 64 \
  --out $E/probe/untrained.json
[ -f $E/probe/warm_start.json ] || run probe_warm_start $PY -m s3_jax.probe --config $C $P $J --questions 32 \
  --skip 64 --init $E/sft --out $E/probe/warm_start.json
EV="--config.evaluate.sample=100 $J"
# The seeds first (their checkpoints live only as long as this machine), then the rows that need no training.
for S in "$@"; do
  run train_seed$S $PY -m s3_jax.train --config $C $PT --config.seed=$S --config.searcher.init_from=$E/sft \
    --workdir $E/train/seed$S
  run eval_trained_seed$S $PY -m s3_jax.evaluate --config $C $P $EV --method s3 --checkpoint $E/train/seed$S \
    --out $E/eval/trained/seed$S
done
run eval_closed_book $PY -m s3_jax.evaluate --config $C $P $EV --method none --out $E/eval/closed_book
run eval_rag $PY -m s3_jax.evaluate --config $C $P $EV --method rag --out $E/eval/rag
run eval_untrained $PY -m s3_jax.evaluate --config $C $P $EV --method s3 --out $E/eval/untrained
run eval_warm_start $PY -m s3_jax.evaluate --config $C $P $EV --method s3 --checkpoint $E/sft \
  --out $E/eval/warm_start
