"""The policy trained by reinforcement (l2pd_harness/filter/reinforce.py): its threshold start, sampling, rewards,
advantages, gradient, and the `l2pd train-policy` command on the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from l2pd_harness.cli import main
from l2pd_harness.decoding.policies import Learned, StepState, Threshold
from l2pd_harness.decoding.scheduler import RunnerOutput
from l2pd_harness.filter import model as filter_model
from l2pd_harness.filter.model import (
    FEATURES,
    NEIGHBOUR_FEATURES,
    POSITION_FEATURES,
    FilterCard,
    FilterConfig,
    FilterError,
    FilterNet,
    LearnedFilter,
    block_features,
)
from l2pd_harness.filter.reinforce import (
    ReinforceConfig,
    RolloutRecorder,
    SampledCommits,
    decode_rewards,
    group_advantages,
    init_as_threshold,
    policy_loss,
)

RL_FEATURES = POSITION_FEATURES + NEIGHBOUR_FEATURES


def synthetic_state(batch: int, length: int = 32, seed: int = 0) -> StepState:
    generator = torch.Generator().manual_seed(seed)
    confidence = torch.rand(batch, length, generator=generator, dtype=torch.float64)
    masked = torch.rand(batch, length, generator=generator) < 0.7
    masked[:, -1] = True  # every row has something left to commit
    return StepState(confidence=confidence, prediction=torch.zeros(batch, length, dtype=torch.long), masked=masked,
                     block_step=torch.zeros(batch, dtype=torch.long), noise=torch.zeros(batch, length),
                     margin=confidence / 2, entropy=1 - confidence)


def threshold_filter(threshold: float, features: tuple[str, ...] = RL_FEATURES, seed: int = 0) -> LearnedFilter:
    torch.manual_seed(seed)
    net = FilterNet(FilterConfig("position_mlp", features, 32, 16))
    init_as_threshold(net, threshold, sharpness=20.0)
    return LearnedFilter(net, FilterCard(config=net.cfg, base_model="test", accept_threshold=0.5))


@pytest.mark.parametrize("batch", [1, 2, 32])
@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_the_threshold_start_commits_what_the_threshold_rule_commits(batch: int, threshold: float) -> None:
    state = synthetic_state(batch, seed=batch)
    learned = Learned(threshold_filter(threshold), accept_threshold=0.5)
    assert torch.equal(learned(state), Threshold(threshold)(state))


def test_a_threshold_start_needs_a_position_mlp_reading_confidence() -> None:
    with pytest.raises(FilterError, match=r"needs a position_mlp reading 'confidence'.*\['margin'\]"):
        init_as_threshold(FilterNet(FilterConfig("position_mlp", ("margin",), 32, 16)), 0.9, 20.0)


def test_neighbour_features_read_the_positions_beside() -> None:
    confidence = torch.tensor([[0.9, 0.5, 0.7, 0.2]], dtype=torch.float64)
    masked = torch.tensor([[False, True, True, True]])
    left, right, right_settled = block_features(NEIGHBOUR_FEATURES, confidence, None, None, masked).unbind(-1)
    # settled positions read as certain; left of the block is committed, right of it not decoded yet
    assert left[0].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.7])
    assert right[0].tolist() == pytest.approx([0.5, 0.7, 0.2, 0.0])
    assert right_settled[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert set(NEIGHBOUR_FEATURES) <= set(FEATURES)


@pytest.mark.parametrize("batch", [1, 2, 32])
def test_sampled_commits_are_masked_at_least_one_and_follow_the_probabilities(batch: int) -> None:
    state = synthetic_state(batch, seed=3)
    probability = torch.full(state.confidence.shape, 0.3)
    policy = SampledCommits(lambda _: probability, torch.Generator().manual_seed(0))
    draws = torch.stack([policy(state) for _ in range(200)])  # [200, B, L]
    assert not (draws & ~state.masked).any() and draws.any(-1).all()
    share = draws.float().mean() / state.masked.float().mean()
    assert 0.25 < float(share) < 0.4  # 0.3 per masked position, plus the at-least-one fallback


def test_the_recorder_keeps_the_features_the_sampled_policy_made(monkeypatch) -> None:
    """One set of filter inputs per step: the policy makes them, the training observer records that tensor."""
    learned, state = threshold_filter(0.9), synthetic_state(2, seed=7)
    made = []
    real = filter_model.block_features
    monkeypatch.setattr(filter_model, "block_features", lambda *args: made.append(args) or real(*args))
    commit = SampledCommits(learned, torch.Generator().manual_seed(0))(state)
    recorder = RolloutRecorder(learned)
    recorder(None, RunnerOutput([4, 9], commit, [32, 32], state, torch.ones(2, dtype=torch.bool)))
    features, masked, recorded, request = recorder.steps()
    assert len(made) == 1
    assert torch.equal(features, real(RL_FEATURES, state.confidence, state.margin, state.entropy, state.masked))
    assert torch.equal(masked, state.masked) and torch.equal(recorded, commit) and request.tolist() == [4, 9]


def test_rewards_pay_correct_decodes_and_fewer_passes() -> None:
    rows = [{"nfe": 8}, {"nfe": 16}, {"nfe": 8}]
    rewards = decode_rewards(rows, [True, True, False], speed_weight=0.1, blocks=8)
    assert rewards.tolist() == pytest.approx([torch.e ** -0.1, torch.e ** -0.2, 0.0])


def test_advantages_are_relative_to_the_problems_own_decodes() -> None:
    advantage = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), group=2)
    assert advantage[0] > 0 > advantage[1] and advantage[0] == -advantage[1]
    assert advantage[2:].tolist() == [0.0, 0.0]  # decodes rewarded alike teach nothing


def test_a_policy_step_makes_rewarded_commits_more_likely() -> None:
    learned = threshold_filter(0.9)
    state = synthetic_state(2, seed=5)
    features = block_features(RL_FEATURES, state.confidence, state.margin, state.entropy, state.masked)
    commit = state.masked.clone()
    commit[1] = False
    commit[1, -1] = True  # decode 0 committed every masked position, decode 1 one; decode 0 was rewarded
    before = torch.sigmoid(learned.net(features)).detach()
    optimiser = torch.optim.SGD(learned.net.parameters(), lr=0.05)
    policy_loss(learned.net, features, state.masked, commit, torch.tensor([0, 1]),
                torch.tensor([1.0, -1.0])).backward()
    optimiser.step()
    after = torch.sigmoid(learned.net(features)).detach()
    rewarded = state.masked[0]
    assert (after[0][rewarded] >= before[0][rewarded]).all() and (after[0][rewarded] > before[0][rewarded]).any()


@pytest.mark.parametrize("values", [{"rollouts": 1}, {"init_threshold": 1.0}, {"speed_weight": -1.0},
                                    {"problems": 0}, {"lr": 0.0}])
def test_bad_settings_are_refused_by_name(values: dict) -> None:
    (name, value), = values.items()
    with pytest.raises(FilterError, match=f"{name}={value}"):
        ReinforceConfig(**values)


def test_train_policy_writes_a_filter_that_starts_as_the_threshold_rule(tmp_path: Path, capsys) -> None:
    """With no iterations the trained policy is the threshold rule: decodes through `l2pd generate` are identical;
    one iteration on the shipped model writes a filter the learned policy runs."""
    problems = tmp_path / "problems.jsonl"
    assert main(["data", "arith", "--split", "test", "--n", "6", "--seed", "5", "--out", str(problems)]) in (None, 0)
    decode = ["--input", str(problems), "--gen-length", "64", "--eotp", "--batch-size", "6"]
    outputs = {}
    for name, extra in (("start", ["--iterations", "0"]), ("trained", ["--iterations", "1"])):
        main(["train-policy", "--out", str(tmp_path / f"{name}.safetensors"), "--gen-length", "64", "--problems",
              "2", "--rollouts", "2", "--init-threshold", "0.8", *extra])
        summary = json.loads(capsys.readouterr().out)
        assert summary["out"] == str(tmp_path / f"{name}.safetensors")
        main(["generate", *decode, "--policy", "learned", "--filter", str(tmp_path / f"{name}.safetensors"),
              "--output", str(tmp_path / f"{name}.jsonl")])
        outputs[name] = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    main(["generate", *decode, "--policy", "threshold", "--threshold", "0.8", "--output",
          str(tmp_path / "threshold.jsonl")])
    threshold = [json.loads(line) for line in (tmp_path / "threshold.jsonl").read_text().splitlines()]
    assert [(r["canvas"], r["nfe"]) for r in outputs["start"]] == [(r["canvas"], r["nfe"]) for r in threshold]
    card = json.loads((tmp_path / "trained.json").read_text())
    assert card["training"]["method"] == "reinforce" and len(card["training"]["history"]) == 1
    assert card["accept_threshold"] == 0.5 and card["config"]["architecture"] == "position_mlp"
    assert len(outputs["trained"]) == 6
