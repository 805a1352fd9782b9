#!/usr/bin/env bash
# Issue 17's E1 (docs/swd/e1.md): train the 64 px teacher and its students, evaluate every cell at
# three seeds, draw the analysis. Resumable: rerun after an interruption (finished runs are
# skipped by the trainer, evaluated cells by eval). Every run trains first, then the cells are
# evaluated seed by seed, so an interrupted experiment has whole seeds. QUICK=1: CI-sized.
#   bash docs/swd/e1.sh [ROOT]        (default runs/e1; QUICK=1 default runs/e1-quick)
# RUNS: the students to train (default all); EVAL_RUNS: the runs to evaluate (default the teacher
# and RUNS; e.g. only new students when the teacher's seeds are already evaluated).
set -euo pipefail
QUICK=${QUICK:-0}
ROOT=${1:-$([ "$QUICK" = 1 ] && echo runs/e1-quick || echo runs/e1)}
RUNS=${RUNS:-"swd full lcm noise_then_upscale mmd_only no_gan mmd_only_full"}
EVAL_RUNS=${EVAL_RUNS:-"teacher $RUNS"}
SEEDS=${SEEDS:-"0 1 2"}
ARG=""; [ "$QUICK" = 1 ] && ARG=",quick" && SEEDS=${SEEDS_QUICK:-"0"}
CFG=configs/swd_e1.py
stamp() { echo "[e1 $(date -u +%H:%M:%S)] $*"; }

stamp "components"
ldm-scaling train-clip --config "$CFG:run=teacher$ARG"
ldm-scaling train-vae --config "$CFG:run=teacher$ARG"
stamp "train teacher"
ldm-scaling train --config "$CFG:run=teacher$ARG" --workdir "$ROOT/teacher"
for run in $RUNS; do
  stamp "train $run"
  ldm-scaling train --config "$CFG:run=$run$ARG" --workdir "$ROOT/$run" \
      --config.objective.teacher="$ROOT/teacher"
done
for seed in $SEEDS; do
  for run in $EVAL_RUNS; do
    stamp "eval $run seed $seed"
    teacher=(); [ "$run" != teacher ] && teacher=(--config.objective.teacher="$ROOT/teacher")
    # One table per seed: a table holds one row per cell (eval refuses another seed's rows).
    ldm-scaling eval --config "$CFG:run=$run$ARG" --config.eval.seed="$seed" "${teacher[@]}" \
        --workdir "$ROOT/$run" --results "$ROOT/results/seed$seed"
  done
done
stamp "analysis"
first=${SEEDS%% *}
ldm-scaling analyze --results "$ROOT/results/seed$first" --out "$ROOT/analysis"
python -m ldm_scaling.analysis.seeds "$ROOT"/results/seed* --out "$ROOT/e1_summary.md"
stamp "done"
