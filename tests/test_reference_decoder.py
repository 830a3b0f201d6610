"""The engine with the ``fixed`` policy is LLaDA's reference sampler: whole decodes on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.engine import generate
from l2pd_harness.decoding.policies import build_policy
from l2pd_harness.decoding.runner import ModelRunner, StepBatch
from l2pd_harness.decoding.scheduler import ScheduledRequest
from l2pd_harness.loading import load_model


def llada_loop_reference(model, prompt: list[int], gen_length: int, block_length: int, steps: int) -> list[int]:
    """LLaDA's published greedy low-confidence loop, written out plainly for one sequence."""
    mask_id = model.config.mask_token_id
    x = torch.tensor([prompt + [mask_id] * gen_length])
    per_block = steps // (gen_length // block_length)
    for b in range(gen_length // block_length):
        lo, hi = len(prompt) + b * block_length, len(prompt) + (b + 1) * block_length
        n_masked = int((x[0, lo:hi] == mask_id).sum())
        quotas = [n_masked // per_block + (1 if i < n_masked % per_block else 0) for i in range(per_block)]
        for quota in quotas:
            logits = model(x)[0]
            probs = logits.double().softmax(-1)
            pred = probs.argmax(-1)
            conf = probs.gather(-1, pred[:, None]).squeeze(-1)
            conf[:lo] = -float("inf")
            conf[hi:] = -float("inf")
            conf[x[0] != mask_id] = -float("inf")
            for pos in torch.topk(conf, quota).indices.tolist():
                x[0, pos] = pred[pos]
    return x[0, len(prompt):].tolist()


@pytest.mark.parametrize("steps", [32, 8])
def test_matches_plain_llada_loop(random_checkpoint: Path, steps: int) -> None:
    model, _ = load_model(random_checkpoint)
    prompt = [1, 5, 9, 12, 7, 3 + 4]
    cfg = DecodeConfig(gen_length=32, block_length=8, steps=steps)
    with torch.no_grad():
        expected = llada_loop_reference(model, prompt, 32, 8, steps)
    (result,) = generate(model, [prompt], cfg)
    assert result.token_ids == expected
    assert result.nfe == steps
    assert sum(result.tokens_per_step) == 32
    assert model.config.mask_token_id not in result.token_ids


def test_one_token_per_step_at_full_steps(random_checkpoint: Path) -> None:
    model, _ = load_model(random_checkpoint)
    (result,) = generate(model, [[1, 2, 3]], DecodeConfig(gen_length=16, block_length=8))
    assert result.tokens_per_step == [1] * 16


def test_left_padded_batch_equals_single_decodes(random_checkpoint: Path) -> None:
    model, _ = load_model(random_checkpoint)
    prompts = [[1, 5, 9], [1, 12, 7, 8, 20, 21, 11], [4] * 12]
    cfg = DecodeConfig(gen_length=24, block_length=8, steps=12)
    together = generate(model, prompts, cfg)
    alone = [generate(model, [p], cfg)[0] for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_sampling_options_are_seeded(random_checkpoint: Path) -> None:
    model, _ = load_model(random_checkpoint)
    greedy = generate(model, [[1, 2, 3]], DecodeConfig(gen_length=16, block_length=16))[0].token_ids
    for options in ({"temperature": 1.0}, {"remasking": "random"}, {"cfg_scale": 2.0}):
        cfg = DecodeConfig(gen_length=16, block_length=16, seed=3, **options)
        first, second = (generate(model, [[1, 2, 3]], cfg)[0].token_ids for _ in range(2))
        assert first == second, options
        assert model.config.mask_token_id not in first
    sampled = [generate(model, [[1, 2, 3]], DecodeConfig(gen_length=16, block_length=16, temperature=1.0,
                                                            seed=s))[0].token_ids for s in range(4)]
    assert any(s != greedy for s in sampled)


@pytest.mark.parametrize("settings, message", [
    ({"gen_length": 32, "block_length": 7}, "block_length=7 must be a positive divisor of gen_length=32"),
    ({"gen_length": 32, "block_length": 8, "steps": 6}, "steps=6 must be a multiple of the number of blocks"),
    ({"remasking": "high"}, r"remasking='high' is not one of \['low_confidence', 'random'\]"),
    ({"temperature": -1.0}, "temperature=-1.0 must be >= 0"),
])
def test_bad_settings_name_the_value(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecodeConfig(**settings)


def test_classifier_free_guidance_logits(random_checkpoint: Path) -> None:
    """The guided pass is uncond + (s + 1) * (cond - uncond), the unconditional pass seeing the prompt masked."""
    model, _ = load_model(random_checkpoint)
    cfg = DecodeConfig(gen_length=8, block_length=8, cfg_scale=2.0)
    prompt, mask_id = [1, 5, 9, 12], model.config.mask_token_id
    tokens = torch.tensor(prompt + [mask_id] * 8)
    row = ScheduledRequest(0, 0, tokens, prompt_length=4, block_start=4, block_step=0, reference=None)
    batch = StepBatch.of([row], model.config.eos_token_id, torch.device("cpu"))
    guided, _ = ModelRunner(model, cfg, build_policy(cfg))._full_pass(batch)
    with torch.no_grad():
        cond = model(tokens[None])[0, 4:]
        uncond = model(torch.tensor([mask_id] * 4 + [mask_id] * 8)[None])[0, 4:]
    torch.testing.assert_close(guided[0], uncond + 3.0 * (cond - uncond))
    with pytest.raises(ValueError, match="cfg_scale=1.0 needs cache='none'"):
        DecodeConfig(cfg_scale=1.0, cache="dual")


def test_a_shorter_canvas_keeps_the_passes_per_block() -> None:
    cfg = DecodeConfig(gen_length=256, block_length=32, steps=64).for_canvas(96)
    assert (cfg.gen_length, cfg.steps, cfg.steps_per_block) == (96, 24, 8)
