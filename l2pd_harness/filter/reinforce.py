"""Train a decode policy by reinforcement against the frozen model, instead of from oracle labels.

The policy is a ``position_mlp`` filter read as a per-position commit probability. It starts as the confidence
threshold rule exactly (:func:`init_as_threshold`), then every iteration decodes training problems several times
with commits sampled from its probabilities, rewards each decode for being correct and for taking few forward
passes, and takes one policy-gradient step in which each problem's decodes are one another's baseline
(group-relative advantages, as in GRPO). Deployed as ``policy=learned``, it commits the positions whose probability
exceeds the accept threshold (0.5 by default: the boundary it sampled around).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.policies import Filter, StepState, at_least_one
from l2pd_harness.decoding.scheduler import RunnerOutput, SchedulerOutput
from l2pd_harness.evaluation import grade_rows, iter_decoded
from l2pd_harness.filter.model import FilterCard, FilterConfig, FilterError, FilterNet, LearnedFilter
from l2pd_harness.tasks import sample_problems


@dataclass
class ReinforceConfig:
    """Knobs of ``l2pd train-policy``."""

    iterations: int = 30
    """Policy-gradient steps, each on freshly decoded training problems."""
    problems: int = 16
    """Training problems per task per iteration."""
    rollouts: int = 8
    """Decodes of each problem per iteration: the group whose mean reward is each decode's baseline."""
    lr: float = 3e-3
    """Adam learning rate."""
    speed_weight: float = 0.1
    """Reward of a decode: correct * exp(-speed_weight * forward passes per block of the canvas)."""
    init_threshold: float = 0.9
    """The confidence threshold the policy starts as."""
    sharpness: float = 20.0
    """Initial logit per unit of confidence around ``init_threshold``: how far from it sampling explores."""
    data_seed: int = 1000
    """Problems of iteration i are drawn from the training split with seed ``data_seed + i``."""
    seed: int = 0
    """Seed of initialisation and of the sampled commits."""

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.problems < 1:
            raise FilterError(f"iterations={self.iterations} must be >= 0 and problems={self.problems} >= 1")
        if self.rollouts < 2:
            raise FilterError(f"rollouts={self.rollouts} must be at least 2 (a problem's decodes are its baseline)")
        if not 0 < self.init_threshold < 1:
            raise FilterError(f"init_threshold={self.init_threshold} must be in (0, 1)")
        for name in ("lr", "sharpness"):
            if not 0 < getattr(self, name) < math.inf:
                raise FilterError(f"{name}={getattr(self, name)} must be a positive number")
        if not 0 <= self.speed_weight < math.inf:
            raise FilterError(f"speed_weight={self.speed_weight} must be >= 0")


def init_as_threshold(net: FilterNet, threshold: float, sharpness: float) -> None:
    """Set a ``position_mlp``'s weights so its logit is ``sharpness * (confidence - threshold)`` at every masked
    position: accepting above probability 0.5 is then exactly the threshold rule. Two hidden units carry it
    (ReLU(x) - ReLU(-x) = x); the others start with random inputs and no say in the output."""
    if net.cfg.architecture != "position_mlp" or "confidence" not in net.cfg.features or net.cfg.hidden_size < 2:
        raise FilterError(f"a threshold start needs a position_mlp reading 'confidence' with hidden_size >= 2, got "
                          f"{net.cfg.architecture} on {list(net.cfg.features)}, hidden_size={net.cfg.hidden_size}")
    first, last = net.mlp[0], net.mlp[2]
    column = net.cfg.features.index("confidence")
    with torch.no_grad():
        first.weight[:2] = 0.0
        first.weight[0, column], first.weight[1, column] = sharpness, -sharpness
        first.bias[0], first.bias[1] = -sharpness * threshold, sharpness * threshold
        last.weight.zero_()
        last.weight[0, 0], last.weight[0, 1] = 1.0, -1.0
        last.bias.zero_()


@dataclass(frozen=True)
class SampledCommits:
    """The exploring policy: each masked position is committed with the filter's probability (at least one per
    pass, the most confident, as every rule)."""

    filter: Filter
    generator: torch.Generator

    def __call__(self, state: StepState) -> torch.Tensor:
        probability = self.filter(state)  # [B, L]
        draw = torch.rand(probability.shape, generator=self.generator, device=probability.device)
        return at_least_one(draw < probability, state)


class RolloutRecorder:
    """An engine step observer keeping what the policy saw and did: ``learned``'s features (those the policy made
    at that step), masked positions, commits."""

    def __init__(self, learned: LearnedFilter):
        self.learned, self.chunks = learned, []

    def __call__(self, scheduled: SchedulerOutput, output: RunnerOutput) -> None:
        state = output.state
        self.chunks.append((self.learned.features(state).cpu(), state.masked.cpu(), output.commit_mask.cpu(),
                            torch.tensor(output.request_ids)))

    def steps(self) -> tuple[torch.Tensor, ...]:
        """``features [N, L, F]``, ``masked [N, L]``, ``commit [N, L]``, ``request [N]`` over every step's rows."""
        return tuple(torch.cat(column) for column in zip(*self.chunks, strict=True))


def decode_rewards(rows: list[dict], correct: list[bool], speed_weight: float, blocks: int) -> torch.Tensor:
    """``[R]``: each decode's correctness times ``exp(-speed_weight * nfe / blocks)``."""
    return torch.tensor([ok * math.exp(-speed_weight * row["nfe"] / blocks) for row, ok in zip(rows, correct,
                                                                                                  strict=True)])


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """``[R]`` rewards of ``R / group`` problems' consecutive decodes, minus their problem's mean and over its
    standard deviation (zero where a problem's decodes were rewarded alike: nothing to learn from them)."""
    grouped = rewards.view(-1, group)  # [problems, group]
    spread = grouped.std(-1, keepdim=True)
    return ((grouped - grouped.mean(-1, keepdim=True)) / spread.clamp(min=1e-6)).view(-1)


def policy_loss(net: nn.Module, features: torch.Tensor, masked: torch.Tensor, commit: torch.Tensor,
                request: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """REINFORCE: minus the advantage-weighted log-probability of every recorded pass's commits (Bernoulli per
    masked position), averaged over decodes."""
    log_prob = -nn.functional.binary_cross_entropy_with_logits(net(features), commit.float(),
                                                               reduction="none")  # [N, L]
    per_pass = (log_prob * masked.float()).sum(-1)  # [N]
    return -(advantage[request] * per_pass).sum() / len(advantage)


def reinforce(model, tokenizer, tasks: list[str], decode_cfg: DecodeConfig, cfg: ReinforceConfig,
              filter_cfg: FilterConfig, base_model: str,
              on_iteration: Callable[[LearnedFilter], None] | None = None) -> LearnedFilter:
    """Train a policy for ``decode_cfg``'s decode (block length, cache, EoTP) of ``tasks``' training problems;
    ``on_iteration`` gets the policy after every step (its card's training history up to date), to save it."""
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = FilterNet(filter_cfg)
    init_as_threshold(net, cfg.init_threshold, cfg.sharpness)
    learned = LearnedFilter(net, FilterCard(config=filter_cfg, base_model=base_model, accept_threshold=0.5,
                                            cache=decode_cfg.cache))
    device = next(model.parameters()).device
    policy = SampledCommits(learned, torch.Generator(device=device).manual_seed(cfg.seed))
    optimiser = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    blocks, history = decode_cfg.gen_length // decode_cfg.block_length, []
    learned.card.training = {"method": "reinforce", "tasks": tasks, "gen_length": decode_cfg.gen_length,
                             "eotp": decode_cfg.eotp, **asdict(cfg),
                             "parameters": sum(p.numel() for p in net.parameters()), "history": history}
    bar = tqdm(range(cfg.iterations), desc="train policy", unit="iteration")
    for iteration in bar:
        problems = [p for task in tasks for p in sample_problems(task, "train", cfg.problems,
                                                                  cfg.data_seed + iteration)]
        rows = [problem for problem in problems for _ in range(cfg.rollouts)]
        recorder = RolloutRecorder(learned)
        decoded = list(iter_decoded(model, tokenizer, rows, decode_cfg, policy=policy, on_step=recorder,
                                    desc=f"rollouts {iteration + 1}/{cfg.iterations}"))
        correct = grade_rows(decoded)
        rewards = decode_rewards(decoded, correct, cfg.speed_weight, blocks)
        net.train()
        optimiser.zero_grad()
        loss = policy_loss(net, *recorder.steps(), group_advantages(rewards, cfg.rollouts))
        loss.backward()
        optimiser.step()
        net.eval()
        history.append({"iteration": iteration, "accuracy": round(sum(correct) / len(correct), 4),
                        "mean_nfe": round(sum(r["nfe"] for r in decoded) / len(decoded), 3),
                        "mean_reward": round(float(rewards.mean()), 4), "loss": round(loss.item(), 5)})
        bar.set_postfix(accuracy=history[-1]["accuracy"], nfe=history[-1]["mean_nfe"])
        learned.card.training["wall_time_s"] = round(time.perf_counter() - started, 1)
        if on_iteration is not None:
            on_iteration(learned)
    learned.card.training["wall_time_s"] = round(time.perf_counter() - started, 1)
    return learned
