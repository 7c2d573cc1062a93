#!/usr/bin/env bash
# Refactor check: the --quick benchmarks of two commits side by side, alternating, on this machine.
#   bash benchmarks/refactor_check.sh OLD_COMMIT NEW_COMMIT
# Each commit is checked out into its own worktree (so this tree's records stay untouched) and run
# with this environment's python; the record is benchmarks/results/refactor_check.md.
set -u
OLD=${1:?old commit}; NEW=${2:?new commit}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WORK=$(mktemp -d); OUT=$WORK/out; mkdir -p "$OUT"
export DISTILPOSE_NO_PROGRESS=1
git -C "$ROOT" worktree add -q --detach "$WORK/old" "$OLD"
git -C "$ROOT" worktree add -q --detach "$WORK/new" "$NEW"
start=$(date -u +"%Y-%m-%d %H:%M UTC"); load0=$(cut -d' ' -f1-3 /proc/loadavg)
for b in store_bench train_bench dump_bench; do
  for side in old new; do
    (cd "$WORK/$side" && "$PY" -m benchmarks.$b --quick > "$OUT/${side}_$b.md" 2> "$OUT/${side}_$b.err")
  done
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "## Refactor check: --quick benchmarks before and after (recorded)"
  echo
  echo "\`old\` = $(git -C "$ROOT" rev-parse --short "$OLD"), \`new\` = $(git -C "$ROOT" rev-parse --short "$NEW");"
  echo "$(nproc) CPU cores, started $start, load average $load0 at the start and $load1 at the end;"
  echo "each benchmark ran old then new, back to back. Command: \`bash benchmarks/refactor_check.sh $OLD $NEW\`."
  for b in store_bench train_bench dump_bench; do
    for side in old new; do
      echo; echo "### $b, $side"; echo
      sed 's/^#/####/' "$OUT/${side}_$b.md"
    done
  done
} > "$ROOT/benchmarks/results/refactor_check.md"
git -C "$ROOT" worktree remove --force "$WORK/old"; git -C "$ROOT" worktree remove --force "$WORK/new"
echo "wrote benchmarks/results/refactor_check.md"
