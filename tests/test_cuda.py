"""The engine on a CUDA device (skipped without one; scripts/gpu-check.sh runs them on a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from l2pd_harness.decoding.engine import Engine
from l2pd_harness.decoding.scheduler import DecodeError
from l2pd_harness.loading import load_model
from l2pd_harness.settings import make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = [[5, 9, 14], [7] * 12, [20, 21, 22, 23, 24], [9] * 6]
SETTINGS = [{"policy": "fixed", "steps": 16}, {"policy": "threshold", "threshold": 0.3, "eotp": True, "cache": "dual"},
            {"policy": "fixed", "steps": 16, "cache": "prefix", "eotp": True, "eotp_mode": "truncate"}]


def decode(model, batch_size: int, **settings) -> list:
    cfg = make_config({"gen_length": 64, "block_length": 16, "batch_size": batch_size, **settings})
    return Engine(model, cfg, eot_ids=set(range(0, 40))).generate(PROMPTS)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_fp32_outputs_on_cuda_do_not_depend_on_batch_size(random_checkpoint: Path, settings: dict) -> None:
    model = load_model(random_checkpoint, device="cuda")[0]
    alone = decode(model, 1, **settings)
    together = decode(model, 4, **settings)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    mask = model.config.mask_token_id
    assert all(mask not in r.token_ids for r in alone)


def test_bf16_decodes_finish_and_repeat_on_cuda(random_checkpoint: Path) -> None:
    model = load_model(random_checkpoint, dtype="bfloat16", device="cuda")[0]
    for settings in SETTINGS:
        results = decode(model, 4, **settings)
        assert all(model.config.mask_token_id not in r.token_ids for r in results)
        assert [r.token_ids for r in decode(model, 4, **settings)] == [r.token_ids for r in results]  # README's claim


def test_a_batch_beyond_the_free_memory_is_refused_before_any_work(random_checkpoint: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(random_checkpoint, device="cuda")[0]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1024, 2**30))
    with pytest.raises(DecodeError, match="need about .* GiB .* besides the weights, but the device has 0.0 of 1.0"):
        decode(model, 4, cache="dual")
