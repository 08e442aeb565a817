#!/usr/bin/env bash
# A recorded try (issue 19's remedies; shown on the results page under the tries, never in the table): one seed
# of the learn config with some settings changed, trained from the same warm start into tries/NAME/seedS and
# its last step evaluated on the table's 100 held-out questions with the table's scoring. Resumes when rerun.
#   experiments/laptop/try.sh NAME SEED [--config.KEY=VALUE ...]
#   e.g. experiments/laptop/try.sh d_s3_rag_format 0 --config.reward.rag_context_format=d_s3
# A try that changes how naive RAG's baseline is computed (reward.rag_context_format, reward.use_judge,
# precompute.*) gets a naive-RAG precompute of its own in tries/NAME/precompute; otherwise it reuses the
# table's (precompute_span). Write tries/NAME/seedS/note.md by hand: what was tried, why, what it gave.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 NAME SEED [--config.KEY=VALUE ...]" >&2; exit 2; }
NAME=$1 SEED=$2
shift 2
cd "$(dirname "$0")/../.."
E=experiments/laptop
T=$E/tries/$NAME
C=configs/smollm2_wiki.py:learn
PY=${PY:-.venv/bin/python}
for arg in "$@"; do
  case $arg in
    --config.*=*) ;;
    *) echo "$0: $arg is not a --config.KEY=VALUE override" >&2; exit 2 ;;
  esac
done
PT=--config.precompute.dir=$E/precompute_span
if printf '%s\n' "$@" | grep -qE '^--config\.(reward\.(rag_context_format|use_judge)|precompute\.)'; then
  PT=--config.precompute.dir=$T/precompute
fi
mkdir -p "$T/seed$SEED"
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
echo "[$(stamp)] try $NAME seed $SEED: $* (code $(git rev-parse --short HEAD))" >> "$T/seed$SEED/commands.log"
# The warm start's weights are not committed: a fresh machine regenerates them (commands.sh step 1; its
# sft.json is rewritten, so `git diff` shows whether the traces and losses came out the same).
if [ ! -f $E/sft/model.safetensors ]; then
  echo "[$(stamp)] regenerating the warm start (commands.sh step 1)" >> "$T/seed$SEED/commands.log"
  $PY -m s3_jax.sft --config $C --config.precompute.dir=$E/precompute --config.reward.use_judge=True --out $E/sft \
    --questions 64 --epochs 1 --lr 1e-5 --micro 2 --seed 0 >> "$T/seed$SEED/sft.log" 2>&1
fi
$PY -m s3_jax.train --config $C $PT "$@" --config.seed="$SEED" --config.searcher.init_from=$E/sft \
  --workdir "$T/seed$SEED" >> "$T/seed$SEED/train.log" 2>&1
echo "[$(stamp)] trained" >> "$T/seed$SEED/commands.log"
$PY -m s3_jax.evaluate --config $C --config.precompute.dir=$E/precompute --config.evaluate.sample=100 \
  --config.reward.use_judge=True --method s3 --checkpoint "$T/seed$SEED" --out "$T/seed$SEED/eval" \
  >> "$T/seed$SEED/eval.log" 2>&1
echo "[$(stamp)] evaluated" >> "$T/seed$SEED/commands.log"
