#!/usr/bin/env bash
# Both device jobs inside one lent session (15 minutes of device time, at most 10 per command, a minute or two of it
# spent starting the machine): gpu-train.sh cut to fit (STEPS, 3,000 by default, and LONG_N problems at gen 1024), then
# gpu-check.sh. Each runs under its own time limit (TRAIN_S, CHECK_S seconds), so one that overruns cannot take the
# other's results; what either wrote before its limit is kept. Results are packed into $OUT (the device tool returns
# at most 8 files): train.tar.gz (the checkpoint without its optimiser state, eval.jsonl, train.log) and check.tar.gz.
# Run it as: OUT=... bash scripts/gpu-lease.sh (the device tool sets OUT). The working tree travels only under 64 MiB:
# move results/sweep-full, results/policy-rl, results/tiny-model/candidate-pairsum and results/tiny-model/pairsum-copy
# aside for the call (the rest is about 16 MiB).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu-lease}"
TRAIN_S="${TRAIN_S:-360}"; CHECK_S="${CHECK_S:-180}"
WORK="$(mktemp -d)"
mkdir -p "$OUT" "$WORK/train" "$WORK/check"
pack() {  # pack NAME DIR: DIR's files, trainer state left out, into $OUT/NAME.tar.gz
    tar -czf "$OUT/$1.tar.gz" --exclude='trainer_state*' -C "$2" .
}
echo "== gpu-train.sh (limit ${TRAIN_S}s)"
OUT="$WORK/train" STEPS="${STEPS:-3000}" LONG_N="${LONG_N:-200}" timeout --kill-after=10 "$TRAIN_S" \
    bash scripts/gpu-train.sh >"$WORK/train/train.log" 2>&1
echo "gpu-train.sh exit $? after ${SECONDS}s"; tr "\r" "\n" <"$WORK/train/train.log" | grep -v '%|' | tail -n 25
pack train "$WORK/train"
echo "== gpu-check.sh (limit ${CHECK_S}s)"
OUT="$WORK/check" PASSES="${PASSES:-16}" timeout --kill-after=10 "$CHECK_S" \
    bash scripts/gpu-check.sh >"$WORK/check/check.log" 2>&1
echo "gpu-check.sh exit $? after ${SECONDS}s"; tr "\r" "\n" <"$WORK/check/check.log" | grep -v '%|' | tail -n 25
pack check "$WORK/check"
ls -l "$OUT"
