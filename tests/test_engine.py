"""The engine: scheduler bookkeeping on fake runner outputs, EoTP, KV cache numerics, continuous batching and
batch-size invariance on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from l2pd_harness.decoding.config import DecodeConfig
from l2pd_harness.decoding.engine import Engine
from l2pd_harness.decoding.kv_cache import KVCache
from l2pd_harness.decoding.policies import StepState
from l2pd_harness.decoding.runner import confidence_of, row_max
from l2pd_harness.decoding.scheduler import RunnerOutput, Scheduler
from l2pd_harness.loading import load_model

MASK, EOS, EOT = 3, 0, 7
PROMPTS = [[1, 5, 9], [1, 12, 7, 8, 20, 21, 11, 6, 9], [4] * 14, [2, 8], [30, 31, 32, 33, 34], [9] * 6]


@pytest.fixture(scope="module")
def model(random_checkpoint: Path):
    return load_model(random_checkpoint)[0]


def fake_output(scheduler: Scheduler, commits: dict[int, dict[int, int]], block_length: int,
                confidence: dict[int, float] | None = None) -> RunnerOutput:
    """A runner's answer committing ``{request_id: {block offset: token}}`` (every request's confidence at a block
    offset from ``confidence``, 0.5 elsewhere)."""
    ids = list(scheduler.running)
    commit_mask = torch.zeros(len(ids), block_length, dtype=torch.bool)
    prediction = torch.full((len(ids), block_length), 50)
    for row, request_id in enumerate(ids):
        for offset, token in commits.get(request_id, {}).items():
            commit_mask[row, offset], prediction[row, offset] = True, token
    zeros = torch.zeros(len(ids), block_length)
    conf = torch.full((len(ids), block_length), 0.5)
    for offset, value in (confidence or {}).items():
        conf[:, offset] = value
    state = StepState(confidence=conf, margin=zeros, entropy=zeros, prediction=prediction, masked=~commit_mask,
                      block_step=torch.zeros(len(ids), dtype=torch.long), noise=zeros)
    return RunnerOutput(ids, commit_mask, [1] * len(ids), state, torch.ones(len(ids), dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confidence_is_the_float64_softmax_probability(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 8, 5000, generator=gen) * 3).to(dtype)  # [B, L, V]
    prediction = torch.randint(0, 5000, (2, 8), generator=gen)  # not always the largest logit
    expected = logits.double().softmax(-1).gather(-1, prediction[..., None]).squeeze(-1)
    torch.testing.assert_close(confidence_of(logits, prediction, logits.amax(-1)), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("width", [100, 128, 1000, 1024])  # shorter than a chunk, one chunk, a tail, no tail
def test_row_max_is_torch_max_with_the_first_index_among_ties(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    values = torch.randint(0, 40, (2, 16, width), generator=gen).float()  # [B, L, V]: many ties
    values[0, 0] = 39.0  # a whole row tied: index 0
    values[0, 1, width - 1] = 99.0  # the last column, in the tail when there is one
    values[1, 3, :] = float("-inf")
    values[1, 3, width // 2] = -1e30
    best, index = row_max(values)
    expected = values.max(dim=-1)
    assert torch.equal(best, expected.values) and torch.equal(index, expected.indices)
    assert index[0, 0] == 0 and index[0, 1] == width - 1 and index[1, 3] == width // 2


def test_confidence_in_a_workspace_is_the_same_and_leaves_the_logits() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 700, generator=gen) * 4  # [B, L, V]
    before = logits.clone()
    prediction, top = logits.argmax(-1), logits.amax(-1)
    workspace = torch.full_like(logits, float("nan"))  # stale contents must not leak into the result
    assert torch.equal(confidence_of(logits, prediction, top, workspace), confidence_of(logits, prediction, top))
    assert torch.equal(logits, before)


def test_confident_positions_keep_their_order_below_one() -> None:
    logits = torch.zeros(1, 4, 1000)  # [B, L, V]
    logits[0, :, 7] = torch.tensor([26.0, 28.0, 30.0, 32.0])  # float32 probabilities all round to 1.0
    confidence = confidence_of(logits, torch.full((1, 4), 7), logits.amax(-1))
    assert (confidence < 1).all() and (confidence.diff() > 0).all()
    tail = 999 / (999 + torch.tensor([26.0, 28.0, 30.0, 32.0], dtype=torch.float64).exp())  # 1 - p, exactly
    torch.testing.assert_close(1 - confidence[0], tail, rtol=1e-3, atol=0)  # float64 rounding of p near 1


def make_scheduler(eotp: bool, batch_size: int = 2, requests: int = 1, eotp_mode: str = "fill") -> Scheduler:
    cfg = DecodeConfig(gen_length=16, block_length=8, eotp=eotp, batch_size=batch_size, eotp_mode=eotp_mode)
    return Scheduler(cfg, MASK, EOS, {EOS, EOT}, [[1, 2]] * requests, None, torch.device("cpu"))


def test_eotp_commits_the_tail_after_a_committed_end_of_text() -> None:
    scheduler = make_scheduler(eotp=True)
    (first,) = scheduler.schedule().requests
    assert len(first.token_ids) == 2 + 16
    assert scheduler.update_from_output(fake_output(scheduler, {0: {0: 40, 5: EOT}}, 8)) == []
    request = scheduler.running[0]
    assert request.live_length == 6 and request.canvas[6:].tolist() == [EOS] * 10
    (second,) = scheduler.schedule().requests
    assert second.token_ids[2 + 6:].tolist() == [EOS] * 10  # later passes still see the tail, as end-of-text
    (done,) = scheduler.update_from_output(fake_output(scheduler, {0: {1: 41, 2: 42, 3: 43, 4: 44}}, 8))
    result = done.result()
    assert result.token_ids == [40, 41, 42, 43, 44, EOT] + [EOS] * 10
    assert result.nfe == 2 and result.tokens_per_step == [2, 4]


def test_eotp_fill_cuts_after_the_first_of_several_end_of_text_commits() -> None:
    scheduler = make_scheduler(eotp=True)
    scheduler.schedule()
    scheduler.update_from_output(fake_output(scheduler, {0: {2: EOT, 5: EOS}}, 8, confidence={2: 0.6, 5: 0.9}))
    assert scheduler.running[0].live_length == 3


def test_paper_eotp_cuts_the_canvas_after_the_most_confident_end_of_text() -> None:
    scheduler = make_scheduler(eotp=True, eotp_mode="truncate")
    scheduler.schedule()
    scheduler.update_from_output(fake_output(scheduler, {0: {0: 40, 2: EOT, 5: EOS}}, 8,
                                             confidence={2: 0.6, 5: 0.9}))
    request = scheduler.running[0]
    assert request.live_length == 6 and request.canvas[6:].tolist() == [EOS] * 10
    (second,) = scheduler.schedule().requests
    assert second.token_ids.tolist() == [1, 2, 40, MASK, EOT, MASK, MASK, EOS]  # the input ends at the cut
    (done,) = scheduler.update_from_output(fake_output(scheduler, {0: {1: 41, 3: 43, 4: 44}}, 8))
    assert done.result().token_ids == [40, 41, EOT, 43, 44, EOS] + [EOS] * 10
    assert done.result().tokens_per_step == [3, 3]


def test_without_eotp_the_whole_canvas_is_decoded() -> None:
    scheduler = make_scheduler(eotp=False)
    scheduler.schedule()
    scheduler.update_from_output(fake_output(scheduler, {0: {i: EOT for i in range(8)}}, 8))
    request = scheduler.running[0]
    assert request.live_length == 16 and request.block == 1 and request.block_step == 0
    (scheduled,) = scheduler.schedule().requests
    assert scheduled.block_start == 2 + 8 and len(scheduled.token_ids) == 18
    (done,) = scheduler.update_from_output(fake_output(scheduler, {0: {i: 60 + i for i in range(8)}}, 8))
    assert done.result().token_ids == [EOT] * 8 + list(range(60, 68))


def test_a_finished_request_hands_its_slot_over_at_once() -> None:
    scheduler = make_scheduler(eotp=True, batch_size=2, requests=3)
    assert [r.request_id for r in scheduler.schedule().requests] == [0, 1]
    (finished,) = scheduler.update_from_output(fake_output(scheduler, {0: {0: EOT}, 1: {0: 40}}, 8))
    assert finished.request_id == 0
    scheduled = scheduler.schedule().requests
    assert [(r.request_id, r.slot) for r in scheduled] == [(1, 1), (2, finished.slot)]
    assert [r.block_step for r in scheduled] == [1, 0]


def decode(model, prompts, eot_ids=None, references=None, **settings):
    cfg = DecodeConfig(gen_length=32, block_length=8, **settings)
    return Engine(model, cfg, eot_ids=eot_ids).generate(prompts, references)


# Half the vocabulary counts as end-of-text, so EoTP fires often on the random model.
FREQUENT_EOT = set(range(0, 40))
SETTINGS = [
    {"policy": "fixed"},
    {"policy": "fixed", "steps": 8, "remasking": "low_confidence", "cache": "dual"},
    {"policy": "threshold", "threshold": 0.3, "eotp": True},
    {"policy": "threshold", "threshold": 0.3, "eotp": True, "cache": "prefix"},
    {"policy": "factor", "factor": 2.0, "cache": "dual", "eotp": True},
    {"policy": "isolated", "threshold": 0.6, "isolated_threshold": 0.1, "eotp": True, "cache": "prefix"},
    {"policy": "threshold", "threshold": 0.3, "eotp": True, "eotp_mode": "truncate"},
    {"policy": "fixed", "steps": 8, "eotp": True, "eotp_mode": "truncate", "cache": "dual"},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_outputs_do_not_depend_on_batch_size(model, settings: dict) -> None:
    alone = decode(model, PROMPTS, FREQUENT_EOT, batch_size=1, **settings)
    for batch_size in (3, 8):
        together = decode(model, PROMPTS, FREQUENT_EOT, batch_size=batch_size, **settings)
        assert [r.token_ids for r in together] == [r.token_ids for r in alone], batch_size
        assert [r.tokens_per_step for r in together] == [r.tokens_per_step for r in alone]


@pytest.mark.parametrize("settings", [SETTINGS[2], SETTINGS[4]], ids=lambda s: "-".join(map(str, s.values())))
def test_bf16_outputs_repeat_at_a_fixed_batch_size_and_order(random_checkpoint: Path, settings: dict) -> None:
    model = load_model(random_checkpoint, dtype="bfloat16")[0]  # the guarantee the README gives for bf16
    first = decode(model, PROMPTS, FREQUENT_EOT, batch_size=3, **settings)
    again = decode(model, PROMPTS, FREQUENT_EOT, batch_size=3, **settings)
    assert [r.token_ids for r in again] == [r.token_ids for r in first]
    assert [r.tokens_per_step for r in again] == [r.tokens_per_step for r in first]


def test_truncating_eotp_shortens_later_passes(model) -> None:
    settings = dict(policy="threshold", threshold=0.3, eotp=True)
    fill = decode(model, PROMPTS, FREQUENT_EOT, **settings)
    cut = decode(model, PROMPTS, FREQUENT_EOT, eotp_mode="truncate", **settings)
    for prompt, kept, shortened in zip(PROMPTS, fill, cut, strict=True):
        assert set(kept.positions_per_step) == {len(prompt) + 32}  # fill: every pass reads the whole canvas
        assert shortened.positions_per_step[0] == len(prompt) + 32
        assert MASK not in shortened.token_ids
    assert sum(sum(r.positions_per_step) for r in cut) < sum(sum(r.positions_per_step) for r in fill)


def test_eotp_cuts_passes(model) -> None:
    full = decode(model, PROMPTS, FREQUENT_EOT, policy="threshold", threshold=0.3)
    cut = decode(model, PROMPTS, FREQUENT_EOT, policy="threshold", threshold=0.3, eotp=True)
    assert sum(r.nfe for r in cut) < sum(r.nfe for r in full)
    for prompt, result in zip(PROMPTS, cut, strict=True):
        end = next(i for i, tok in enumerate(result.token_ids) if tok in FREQUENT_EOT)
        assert result.token_ids[end + 1:] == [EOS] * (31 - end)  # the committed tail reads end-of-text
        assert MASK not in result.token_ids
        assert set(result.positions_per_step) == {len(prompt) + 32}  # every pass still sees the whole canvas
        assert sum(result.tokens_per_step) >= end + 1  # commits later overwritten by an earlier end still count


def test_oracle_commits_exactly_the_predictions_that_match_its_references(model) -> None:
    baseline = decode(model, PROMPTS[:3], policy="fixed")
    steps_with_matches = []

    def check(scheduled, output) -> None:
        state = output.state
        reference = torch.stack([request.reference for request in scheduled.requests])  # [B, L]
        matches = (state.prediction == reference) & state.masked
        for row in range(len(scheduled.requests)):
            if matches[row].any():  # the defining property: exactly the matching masked positions
                assert torch.equal(output.commit_mask[row], matches[row])
                steps_with_matches.append(row)
            else:  # no match: one position, the most confident masked one, so the decode progresses
                assert int(output.commit_mask[row].sum()) == 1

    cfg = DecodeConfig(gen_length=32, block_length=8, policy="oracle")
    list(Engine(model, cfg).stream(PROMPTS[:3], [r.token_ids for r in baseline], on_step=check))
    assert steps_with_matches
    with pytest.raises(ValueError, match="policy 'oracle' needs references"):
        decode(model, PROMPTS[:1], policy="oracle")


def test_each_row_knows_its_request_and_block(model) -> None:
    """With more requests than slots (rows change as requests finish), every row's ``request_id`` and ``block``
    are those of the request the scheduler put there."""
    seen = []

    def check(scheduled, output) -> None:
        state = output.state
        assert state.request_id.tolist() == output.request_ids == [r.request_id for r in scheduled.requests]
        assert state.block.tolist() == [(r.block_start - r.prompt_length) // 8 for r in scheduled.requests]
        seen.extend(state.block.tolist())

    cfg = DecodeConfig(gen_length=32, block_length=8, batch_size=2, policy="threshold", threshold=0.5)
    list(Engine(model, cfg).stream(PROMPTS, on_step=check))
    assert set(seen) == {0, 1, 2, 3}


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_agrees_exactly_on_each_blocks_first_pass(model, cache: str) -> None:
    """With one pass per block every pass is a block's first, a full pass: outputs equal cache=none exactly."""
    none = decode(model, PROMPTS, policy="fixed", steps=4, batch_size=4)
    cached = decode(model, PROMPTS, policy="fixed", steps=4, batch_size=4, cache=cache)
    assert [r.token_ids for r in cached] == [r.token_ids for r in none]


@pytest.mark.parametrize("cache, later_pass", [("prefix", lambda length, start: length - start),
                                               ("dual", lambda length, start: 8)])
def test_cached_passes_compute_fewer_positions(model, cache: str, later_pass) -> None:
    (result,) = decode(model, PROMPTS[1:2], policy="fixed", steps=16, cache=cache)
    length = len(PROMPTS[1]) + 32
    expected = []
    for block in range(4):
        expected += [length] + [later_pass(length, len(PROMPTS[1]) + 8 * block)] * 3
    assert result.positions_per_step == expected


@pytest.mark.parametrize("slot_order", [[2, 0, 1], [0, 1, 2]], ids=["gathered", "consecutive"])
def test_cache_reuse_reproduces_a_full_pass_when_nothing_changed(model, slot_order: list[int]) -> None:
    """Right after a refresh the stored keys/values are exact, so a prefix or dual pass over a slice gives the
    full pass's logits on it (rows of different lengths, right-padded), whether the rows' slots are read through a
    gather or, consecutive, as views of the store."""
    torch.manual_seed(0)
    lengths = torch.tensor([20, 13, 17])
    ids = torch.randint(4, 40, (3, 20)).masked_fill(torch.arange(20) >= lengths[:, None], EOS)
    slots = torch.tensor(slot_order)
    cache = KVCache(model.config, slots=3, dtype=torch.float32, device=torch.device("cpu"))
    with torch.no_grad():
        full = model(ids, kv_cache=cache.refresh(slots, lengths, 20))  # [3, 20, V]
        start = torch.tensor([8, 3, 5])
        for width in (4, 12):  # a dual-sized slice, and one running past each row's end (prefix)
            positions = start[:, None] + torch.arange(width)
            cache_pass = cache.reuse(slots, slot_order, positions, lengths, 20)
            sliced = model(ids.gather(1, positions.clamp(max=19)), kv_cache=cache_pass)
            for row in range(3):
                valid = positions[row] < lengths[row]
                torch.testing.assert_close(sliced[row][valid], full[row, positions[row][valid]], atol=1e-5,
                                           rtol=1e-5)


def test_cache_reads_consecutive_slots_without_copying(model) -> None:
    """Rows in consecutive slots read the store itself (a cached pass at LLaDA-8B's shape would otherwise copy
    every layer's keys and values of the batch); other slot orders get a copy."""
    cache = KVCache(model.config, slots=4, dtype=torch.float32, device=torch.device("cpu"))
    lengths, positions = torch.tensor([10, 10]), torch.tensor([[4, 5], [4, 5]])
    cache.refresh(torch.tensor([0, 1, 2, 3]), torch.full((4,), 10), 10)
    k = torch.randn(2, model.config.n_kv_heads, 2, model.config.head_dim)
    for host_slots, shares_storage in (([1, 2], True), ([2, 1], False), ([0, 2], False)):
        cache_pass = cache.reuse(torch.tensor(host_slots), host_slots, positions, lengths, 10)
        keys, values = cache_pass.update(0, k, k + 1)  # [2, kv_heads, 11, head_dim]
        assert (keys.untyped_storage().data_ptr() == cache.keys[0].untyped_storage().data_ptr()) is shares_storage
        torch.testing.assert_close(keys[:, :, 4:6], k)
        torch.testing.assert_close(values[:, :, 4:6], k + 1)
        torch.testing.assert_close(cache.keys[0][host_slots][:, :, 4:6], k)  # written in place
