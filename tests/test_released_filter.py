"""The Learn2PD paper's released filter: imported from a synthetic checkpoint of exactly the published structure,
accepted for the model it names, refused for any other, and anything but the four tensors refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from l2pd_harness.cli import main
from l2pd_harness.decoding.policies import StepState
from l2pd_harness.filter.model import FilterError, load_filter
from l2pd_harness.filter.released import import_released, read_released


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"linear1.weight": torch.randn(32, 32, generator=gen), "linear1.bias": torch.randn(32, generator=gen),
            "linear2.weight": torch.randn(32, 32, generator=gen), "linear2.bias": torch.randn(32, generator=gen)}


@pytest.fixture
def released(tmp_path: Path) -> Path:
    path = tmp_path / "filter.pth"
    torch.save(released_state(), path)
    return path


def test_imported_filter_computes_the_released_mlp(released: Path, random_checkpoint: Path) -> None:
    learned = import_released(released, random_checkpoint)
    weights = released_state()
    gen = torch.Generator().manual_seed(1)
    confidence = torch.rand(3, 32, generator=gen, dtype=torch.float64)  # [B, L]
    masked = torch.rand(3, 32, generator=gen) < 0.5
    state = StepState(confidence=confidence, margin=confidence, entropy=confidence, prediction=torch.zeros(3, 32),
                      masked=masked, block_step=torch.zeros(3, dtype=torch.long), noise=confidence)
    # The paper's network by hand: committed positions keep their own confidence.
    hidden = torch.relu(confidence.float() @ weights["linear1.weight"].T + weights["linear1.bias"])
    expected = torch.sigmoid(hidden @ weights["linear2.weight"].T + weights["linear2.bias"])
    assert torch.allclose(learned(state), expected, atol=1e-6)
    assert learned.card.accept_threshold == 0.96 and learned.card.config.block_length == 32
    assert learned.card.training["base_model_name"] == str(random_checkpoint)


def test_import_then_generate_on_the_model_it_names_and_only_there(released: Path, random_checkpoint: Path,
                                                                   tmp_path: Path, capsys) -> None:
    out = tmp_path / "paper.safetensors"
    main(["import-filter", str(released), "--base-model", str(random_checkpoint), "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["accept_threshold"] == 0.96
    assert load_filter(out, random_checkpoint, 32).card.base_model == load_filter(
        out, str(random_checkpoint) + "/", 32).card.base_model
    main(["generate", "--model", str(random_checkpoint), "--prompt", "12 + 7", "--gen-length", "64",
          "--preset", "learn2pd-paper", "--filter", str(out), "--no-chat-template"])
    row = json.loads(capsys.readouterr().out)
    assert 0 < row["nfe"] <= 64 and len(row["canvas"]) == 64
    with pytest.raises(SystemExit) as exit_info:  # the shipped tiny model is another model
        main(["generate", "--prompt", "12 + 7", "--policy", "learned", "--filter", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was trained on base model sha256:" in err


class NotATensor:
    pass


@pytest.mark.parametrize("content, message", [
    ({**released_state(), "extra.weight": torch.zeros(1)}, r"holds \['extra.weight', 'linear1.bias'"),
    ({k: v for k, v in released_state().items() if k != "linear2.bias"}, "the Learn2PD filter is exactly"),
    ({**released_state(), "linear1.weight": torch.zeros(32, 16)}, r"linear1.weight is torch.float32 \[32, 16\]"),
    ({**released_state(), "linear2.bias": torch.zeros(32, dtype=torch.long)}, r"linear2.bias is torch.int64"),
    ([torch.zeros(2)], "holds list; the Learn2PD filter is exactly"),
    (NotATensor(), "is not a torch state dict that loads without running code"),
])
def test_anything_but_the_released_tensors_is_refused(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    with pytest.raises(FilterError, match=message):
        read_released(path)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(FilterError, match="is not a torch state dict that loads without running code"):
        read_released(path)
    assert not marker.exists()
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(FilterError, match="empty.pth"):
        read_released(tmp_path / "empty.pth")
    with pytest.raises(FilterError, match="does not exist"):
        read_released(tmp_path / "missing.pth")
