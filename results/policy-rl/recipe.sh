#!/usr/bin/env bash
# Issue 21's learned decode policies, one command: every filter the dominance table of README.md rests on, trained
# from scratch on arith training problems (trace directories already collected are reused). About 90 minutes on 2
# CPU cores from nothing; minutes when the traces are committed. The filters shipped by name beside the tiny model
# (learned-b32, learned-b128, learned-b32-dual, learned-b128-dual) are copies of four of them.
# Usage: bash results/policy-rl/recipe.sh (the filters, rollouts and validation traces go under POLICY_RL, by default
# results/policy-rl/changeone-model, the shipped model's; results/policy-rl itself holds the previous model's)
#   block 32, no cache:  rollout-b32-t0.95-dagger   (rollouts beside threshold 0.95, then a DAgger round)
#   block 128, no cache: rollout-b128               (rollouts beside threshold 0.9)
#   block 32, dual:      rollout-b32-dual-dagger-cw (dual-cache rollouts, a DAgger round, class weights; its
#                        setting chosen again on 160 held-out problems: rollout-b32-dual-dagger-cw-rechosen)
#   block 128, dual:     rollout-b128-dual-dagger-cw (the same; setting chosen again on 100 held-out problems decoded
#                        here: rollout-b128-dual-dagger-cw-rechosen)
set -euo pipefail
cd "$(dirname "$0")/../.."
export POLICY_RL=${POLICY_RL:-results/policy-rl/changeone-model}
ROLLOUT_FILTER=results/policy-rl/rollout-filter.sh
bash $ROLLOUT_FILTER 32 0.95 200 none
bash $ROLLOUT_FILTER 32 0.95 200 none "$POLICY_RL/rollout-b32-t0.95.safetensors"
bash $ROLLOUT_FILTER 128 0.9 200 none
for BLOCK in 32 128; do
    bash $ROLLOUT_FILTER "$BLOCK" 0.9 200 dual
    CLASS_WEIGHT=1 bash $ROLLOUT_FILTER "$BLOCK" 0.9 200 dual "$POLICY_RL/rollout-b$BLOCK-dual.safetensors"
done
l2pd choose-threshold --filter "$POLICY_RL/rollout-b32-dual-dagger-cw.safetensors" \
    --traces results/learn2pd/traces/tr-arith-oracle-fill-dual results/learn2pd/traces/tr-arith13-oracle-fill-dual \
    --thresholds 0.95,0.99 --accept-thresholds 0.5,0.8,0.9 --decode-batch-size 64 \
    --out "$POLICY_RL/rollout-b32-dual-dagger-cw-rechosen.safetensors"
VALIDATION=$POLICY_RL/validation/arith-b128-oracle-dual
[ -f "$VALIDATION/meta.json" ] || l2pd collect-traces --task arith --n 100 --data-seed 21 --trajectory oracle \
    --block-length 128 --cache dual --eotp --batch-size 64 --out "$VALIDATION"
l2pd choose-threshold --filter "$POLICY_RL/rollout-b128-dual-dagger-cw.safetensors" --traces "$VALIDATION" \
    --accept-thresholds 0.3,0.5,0.8,0.9 --decode-batch-size 64 \
    --out "$POLICY_RL/rollout-b128-dual-dagger-cw-rechosen.safetensors"
