#!/usr/bin/env bash
# Issue 21's rollout-labelled filter, one command: label a threshold decode's left-over positions on training
# problems by rollout ("does committing this one now keep the answer correct?"), then train a position_mlp filter
# on those labels that serves beside the threshold (learned_commit=with_threshold). Usage:
#   bash results/policy-rl/rollout-filter.sh [BLOCK_LENGTH] [THRESHOLD] [N] [CACHE] [FOLLOW]
#   (defaults 32, 0.9, 200, none, no FOLLOW)
# Writes $POLICY_RL/rollouts/arith-bBLOCK-tTHRESHOLD[-CACHE]/ and $POLICY_RL/rollout-bBLOCK[-tTHRESHOLD][-CACHE]
# .{safetensors,json} (suffixes only away from 0.9 and none; POLICY_RL defaults to
# results/policy-rl/changeone-model, the shipped model's).
# FOLLOW, a filter this script wrote, makes a DAgger round: N other training problems (data seed 12) decoded by that
# filter beside the threshold, their left-over positions labelled by rollout (traces ...-dagger/), and a filter
# trained on the first round's traces and these together (rollout-...-dagger.*).
# CLASS_WEIGHT=1 trains with --class-weight (the rare unsafe commits weigh as much as the safe ones; files -cw.*).
# Trace directories already collected (meta.json present) are reused, so CLASS_WEIGHT=1 after a plain run only trains.
set -euo pipefail
cd "$(dirname "$0")/../.."
BLOCK=${1:-32}; THRESHOLD=${2:-0.9}; N=${3:-200}; CACHE=${4:-none}; FOLLOW=${5:-}
POLICY_RL=${POLICY_RL:-results/policy-rl/changeone-model}
SUFFIX=$([ "$CACHE" = none ] || echo "-$CACHE")
TRACES=$POLICY_RL/rollouts/arith-b$BLOCK-t$THRESHOLD$SUFFIX
[ "$THRESHOLD" = 0.9 ] || SUFFIX="-t$THRESHOLD$SUFFIX"
TRAIN_FLAGS=()
[ "${CLASS_WEIGHT:-0}" = 1 ] && TRAIN_FLAGS=(--class-weight)
FEATURES=confidence,margin,entropy,position,committed_share,left_settled,confidence_rank,left_confidence,right_confidence,right_settled
COLLECT=(l2pd collect-traces --trajectory rollout --task arith --n "$N" --threshold "$THRESHOLD"
         --block-length "$BLOCK" --rollouts-per-pass 3 --cache "$CACHE" --batch-size 128)
collect() {  # OUT [FLAGS...]: collect-traces unless OUT holds traces already
    if [ -f "$1/meta.json" ]; then echo "reusing the traces in $1 (delete it to collect again)" >&2
    else "${COLLECT[@]}" --out "$@"; fi
}
if [ -z "$FOLLOW" ]; then
    collect "$TRACES"
    ALL=("$TRACES")
else
    [ -d "$TRACES" ] || { echo "FOLLOW $FOLLOW: the first round's traces $TRACES are missing" >&2; exit 2; }
    collect "$TRACES-dagger" --data-seed 12 --filter "$FOLLOW"
    ALL=("$TRACES" "$TRACES-dagger"); SUFFIX="$SUFFIX-dagger"
fi
[ ${#TRAIN_FLAGS[@]} = 0 ] || SUFFIX="$SUFFIX-cw"
l2pd train-filter --traces "${ALL[@]}" --architecture position_mlp --features "$FEATURES" "${TRAIN_FLAGS[@]}" \
    --out "$POLICY_RL/rollout-b$BLOCK$SUFFIX.safetensors"
