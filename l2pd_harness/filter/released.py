"""The filter released with the Learn2PD paper, made usable here: its torch checkpoint converted into this package's
filter checkpoint (weights + card) for one base model.

The released file is a torch pickle of a state dict: ``linear1.weight [32, 32]``, ``linear1.bias [32]``,
``linear2.weight [32, 32]``, ``linear2.bias [32]``, a Linear-ReLU-Linear MLP that reads the top-1 probabilities of
the 32 positions of the current block (committed ones included) and gives one logit per position. It is read with
``torch.load(weights_only=True)``, so no code in it runs, and anything beyond those four tensors is refused.

Base-model identity: the card records the fingerprint (:func:`l2pd_harness.loading.model_fingerprint`) of the
checkpoint named by ``--base-model``, computed from the importing user's own copy. A published checkpoint is the
same files for everyone who downloaded it, so the filter imported against one copy of LLaDA-8B-Instruct serves
every other copy of that revision, and is still refused for any other model.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import torch

from l2pd_harness.filter.model import FilterCard, FilterConfig, FilterError, FilterNet, LearnedFilter
from l2pd_harness.loading import model_fingerprint, resolve_checkpoint

RELEASED_TENSORS = {"linear1.weight": ("mlp.0.weight", (32, 32)), "linear1.bias": ("mlp.0.bias", (32,)),
                    "linear2.weight": ("mlp.2.weight", (32, 32)), "linear2.bias": ("mlp.2.bias", (32,))}
"""Released name -> (name in :class:`FilterNet`, shape)."""
RELEASED_CONFIG = FilterConfig(architecture="block_mlp", features=("raw_confidence",), block_length=32,
                               hidden_size=32)
PAPER_ACCEPT_THRESHOLD = 0.96
"""The accept threshold published with the filter."""


def read_released(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The four tensors of a released checkpoint, as float32; anything else in the file is refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise FilterError(f"released filter {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FilterError(f"released filter {str(path)!r} is not a torch state dict that loads without running "
                          f"code ({reason[:200]})") from None
    expected = ", ".join(f"{name} {list(shape)}" for name, (_, shape) in RELEASED_TENSORS.items())
    if not isinstance(state, dict) or set(state) != set(RELEASED_TENSORS):
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise FilterError(f"released filter {str(path)!r} holds {found}; the Learn2PD filter is exactly {expected}")
    for name, (_, shape) in RELEASED_TENSORS.items():
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise FilterError(f"released filter {str(path)!r}: {name} is a {type(tensor).__name__}, expected a float "
                              f"tensor {list(shape)}")
        if not tensor.is_floating_point() or tuple(tensor.shape) != shape:
            found = f"{tensor.dtype} {list(tensor.shape)}"
            raise FilterError(f"released filter {str(path)!r}: {name} is {found}, expected a float tensor "
                              f"{list(shape)}")
    return {name: state[name].float() for name in RELEASED_TENSORS}


def import_released(path: str | os.PathLike, base_model: str | os.PathLike,
                    accept_threshold: float = PAPER_ACCEPT_THRESHOLD) -> LearnedFilter:
    """The released filter at ``path`` as a :class:`LearnedFilter` for the checkpoint ``base_model`` (a directory
    or a hub id in the local Hugging Face cache)."""
    tensors = read_released(path)
    ckpt = resolve_checkpoint(base_model)
    net = FilterNet(RELEASED_CONFIG)
    net.load_state_dict({RELEASED_TENSORS[name][0]: tensor for name, tensor in tensors.items()})
    card = FilterCard(
        config=RELEASED_CONFIG, base_model=model_fingerprint(ckpt), accept_threshold=accept_threshold,
        training={"source": "Learn2PD released filter (arXiv 2509.25188)", "file": Path(path).name,
                  "file_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
                  "base_model_name": str(base_model), "base_model_path": str(ckpt)})
    return LearnedFilter(net, card)
