"""Find a checkpoint (local directory or Hugging Face cache) and load model + tokenizer from it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from l2pd_harness.files import FileFormatError, open_tensors, read_json, save_tensors_atomic, write_atomic
from l2pd_harness.models.common import BidirectionalLM, ConfigError, align_predictions
from l2pd_harness.models.dream import DreamConfig, DreamModel
from l2pd_harness.models.llada import LLaDAConfig, LLaDAModel

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-llada"
"""The embedded tiny dLLM shipped with the package; the default of every command."""

FAMILIES: dict[str, tuple[type, type[BidirectionalLM]]] = {
    "llada": (LLaDAConfig, LLaDAModel),
    "Dream": (DreamConfig, DreamModel),
}
"""Native model families by config.json ``model_type`` (config class, model class); a config without the key is
LLaDA's, whose own configuration class may leave it out."""
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
BACKENDS = ("native", "hf")
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
CHECKPOINT_LAYOUT = "expected a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer files)"
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")


class ModelLoadError(ValueError):
    """A checkpoint that cannot be found or does not match the model it claims to be."""


def resolve_checkpoint(pretrained: str | os.PathLike | None) -> Path:
    """Local directory of ``pretrained``: a path, a hub id found in the local HF cache, or the shipped tiny model."""
    if pretrained is None:
        return DEFAULT_MODEL_DIR
    name = os.fspath(pretrained)
    path = Path(name).expanduser()
    if path.is_dir():
        return _checkpoint_dir(path)
    if path.exists():
        raise ModelLoadError(f"model {name!r} is a file; {CHECKPOINT_LAYOUT}")
    if not isinstance(pretrained, str) or _looks_like_path(name):
        raise ModelLoadError(f"model directory {name!r} does not exist")
    if "/" not in name:
        raise ModelLoadError(f"model {name!r} is neither an existing checkpoint directory nor a hub id (owner/name)")
    return _cached_hub_snapshot(name)


def _checkpoint_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {str(path)!r} has no config.json; {CHECKPOINT_LAYOUT}")
    return path


def _looks_like_path(name: str) -> bool:
    """True for a name that only a filesystem path can have: a hub id is ``owner/name`` in letters, digits, ``-``,
    ``_`` and ``.``, so it never starts with ``/``, ``.`` or ``~``, holds no backslash, drive or second ``/``."""
    return (name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name
            or _WINDOWS_DRIVE.match(name) is not None)


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The local-cache snapshot of hub model ``repo_id``: the only place the hub library is consulted."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return _checkpoint_dir(Path(snapshot_download(repo_id, local_files_only=True)))
    except HFValidationError:
        raise ModelLoadError(f"model {repo_id!r} is neither an existing checkpoint directory nor a valid hub id "
                             "(owner/name, in letters, digits, '-', '_' and '.')") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache (nor a local directory) and this program "
            f"never downloads; on a networked machine run `hf download {repo_id}` (or pass a local directory)"
        ) from None


def model_fingerprint(ckpt: Path) -> str:
    """A short identity of the checkpoint in ``ckpt``: SHA-256 over its config and, per weight file, its size and
    first and last MiB (cheap on a 16 GB checkpoint; two different trainings of one architecture differ there)."""
    digest = hashlib.sha256((ckpt / "config.json").read_bytes())
    for file in _tensor_files(ckpt):
        size = file.stat().st_size
        digest.update(str(size).encode())
        with file.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(0, size - (1 << 20)))
            digest.update(handle.read())
    return "sha256:" + digest.hexdigest()[:16]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


DEVICE_TYPES = ("cpu", "cuda", "mps")
"""The kinds of torch device the loaders and trainers run on."""


def available_devices() -> list[str]:
    """The device names this machine can run on, for error messages."""
    cuda = [f"cuda:{index}" for index in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *(["cuda"] if cuda else []), *cuda, *(["mps"] if torch.backends.mps.is_available() else [])]


def parse_device(name: str | torch.device) -> torch.device:
    """``name`` as a device this machine has; a malformed name or an absent accelerator is a ModelLoadError naming
    the devices available here (torch itself fails late, deep in loading or training, with a traceback)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ModelLoadError(f"device {str(name)!r} is not one of {available_devices()}")
    if device.type == "cpu":
        return torch.device("cpu")  # safetensors refuses "cpu:0"
    present = torch.cuda.device_count() if device.type == "cuda" else int(torch.backends.mps.is_available())
    if present == 0 or (device.index or 0) >= present:
        raise ModelLoadError(f"device {str(name)!r} is not available on this machine; available: "
                             f"{available_devices()}")
    return device


def _tensor_files(ckpt: Path) -> list[Path]:
    if (ckpt / SHARD_INDEX).is_file():
        return [ckpt / name for name in sorted(set(_shard_map(ckpt / SHARD_INDEX).values()))]
    if (ckpt / SINGLE_FILE).is_file():
        return [ckpt / SINGLE_FILE]
    raise ModelLoadError(f"no {SINGLE_FILE} or {SHARD_INDEX} in {str(ckpt)!r}")


def _shard_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file name) of a sharded checkpoint's index file."""
    weight_map = read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise FileFormatError(f"shard index {str(index)!r} has no \"weight_map\" object of tensor name -> file name")
    return weight_map


def _iter_tensors(files: list[Path], device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    # One tensor at a time: each is read straight to the target device and cast there.
    for file in files:
        with open_tensors(file, "weight file", device) as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).to(dtype)


def config_from_file(path: Path):
    """A config.json file read as the config class its ``model_type`` names in :data:`FAMILIES`."""
    family = read_json(path, "model config").get("model_type", "llada")
    if family not in FAMILIES:
        raise ConfigError(f"model config {str(path)!r}: model_type={family!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[family][0].from_json(path)


def model_class(config) -> type[BidirectionalLM]:
    """The native model class of a config from :func:`config_from_file`."""
    return next(model for config_class, model in FAMILIES.values() if isinstance(config, config_class))


def load_native(ckpt: Path, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> BidirectionalLM:
    """This package's model of ``ckpt``'s family; built on the meta device, so only one copy of the weights is ever
    made."""
    config = config_from_file(ckpt / "config.json")
    with torch.device("meta"):
        model = model_class(config)(config)
    expected = set(model.state_dict())
    state = dict(_iter_tensors(_tensor_files(ckpt), torch.device(device), dtype))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"checkpoint {str(ckpt)!r} does not match its config: missing tensors {missing}, "
                             f"unexpected tensors {unexpected}")
    for name, param in model.state_dict().items():
        if state[name].shape != param.shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(state[name].shape)}, config implies "
                                 f"{tuple(param.shape)}")
    model.load_state_dict(state, assign=True)
    return model.eval()


def save_llada(model: LLaDAModel, out_dir: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` (LLaDA's tensor names) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")
    save_tensors_atomic(model.state_dict(), out / SINGLE_FILE, metadata={"format": "pt"})


@dataclass
class RemoteCodeIds:
    """What the decoders need to know of a remote-code checkpoint (LLaDAConfig's names)."""

    mask_token_id: int
    eos_token_id: int
    vocab_size: int


class RemoteCodeLM(nn.Module):
    """A checkpoint's own ``trust_remote_code`` model, called like :class:`BidirectionalLM` (ids -> logits at the
    position they predict)."""

    def __init__(self, model: nn.Module, config: RemoteCodeIds, logit_shift: int):
        super().__init__()
        self.inner, self.config = model, config
        self.logit_shift = logit_shift
        """As :attr:`BidirectionalLM.logit_shift` for the checkpoint's family (Dream's own code returns unshifted
        logits)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, kv_cache=None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        if kv_cache is not None:
            raise ValueError("backend='hf' has no KV cache support; use cache='none' or backend='native'")
        logits = self.inner(input_ids, attention_mask=attention_mask).logits[..., : self.config.vocab_size]
        logits = align_predictions(logits, self.logit_shift)
        if logits_index is None:
            return logits
        return logits.gather(1, logits_index[..., None].expand(-1, -1, logits.shape[-1]))


def _load_remote_code(ckpt: Path, dtype: torch.dtype, device: str | torch.device, tokenizer) -> RemoteCodeLM:
    import transformers

    raw = read_json(ckpt / "config.json", "model config")
    if raw.get("model_type") == "llada" and int(transformers.__version__.split(".")[0]) >= 5:
        raise ModelLoadError(
            "backend='hf' cannot load LLaDA here: its remote code (modeling_llada.py) is written for "
            f"transformers 4.x and fails on transformers {transformers.__version__} (it lacks "
            "all_tied_weights_keys, calls tie_weights(missing_keys=...) and reads config.use_cache); "
            "use backend='native', which loads the same weights")
    mask_id = raw.get("mask_token_id", tokenizer.mask_token_id)
    if mask_id is None:
        raise ModelLoadError(f"{str(ckpt)!r}: neither config.json nor the tokenizer names a mask token")
    ids = RemoteCodeIds(mask_id, raw.get("eos_token_id", tokenizer.eos_token_id), raw["vocab_size"])
    model = transformers.AutoModel.from_pretrained(str(ckpt), trust_remote_code=True, dtype=dtype)
    shift = FAMILIES[raw["model_type"]][1].logit_shift if raw.get("model_type") in FAMILIES else 0
    return RemoteCodeLM(model.to(device).eval(), ids, shift)


def load_tokenizer(ckpt: Path, trust_remote_code: bool = False):
    """``AutoTokenizer`` of ``ckpt``, without transformers' warning that it does not know ``model_type: llada``
    (it reads config.json only to look for a tokenizer class; the tokenizer files name theirs).

    ``trust_remote_code`` is passed explicitly: left unset, transformers asks on the terminal whether to run the
    code a config.json ``auto_map`` names (LLaDA's published configs have one) and waits for an answer.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():  # nor its FutureWarning about config keys (Dream's rope_scaling)
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=trust_remote_code)
    except (ValueError, OSError) as err:  # damaged tokenizer files, or a tokenizer that exists only as remote code
        first_line = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ModelLoadError(f"tokenizer of {str(ckpt)!r} cannot be loaded: {first_line}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_model(pretrained: str | os.PathLike | None = None, dtype: str = "float32", device: str = "cpu",
               backend: str = "native"):
    """Load ``(model, tokenizer)``; the model maps ``input_ids [B, T]`` to logits ``[B, T, vocab]``.

    ``pretrained``: a local checkpoint directory, a hub id already in the local HF cache, or ``None`` for the
    shipped tiny model. ``backend``: ``native`` (this package's model of the checkpoint's family, see
    :data:`FAMILIES`) or ``hf`` (the checkpoint's remote code).
    """
    if backend not in BACKENDS:
        raise ModelLoadError(f"backend {backend!r} is not one of {list(BACKENDS)}")
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    ckpt = resolve_checkpoint(pretrained)
    if backend == "native":  # config.json is checked first, so a wrong one is named as such, not as a tokenizer error
        model = load_native(ckpt, torch_dtype, torch_device)
        return model, load_tokenizer(ckpt)
    # Only here is a checkpoint's own code run: the user asked for it by choosing backend='hf'.
    tokenizer = load_tokenizer(ckpt, trust_remote_code=True)
    return _load_remote_code(ckpt, torch_dtype, torch_device, tokenizer), tokenizer
