"""Resolving --weights: 'imagenet' (torchvision's default weights via the torch hub cache; timm's default
weights via the Hugging Face cache), 'random' or a file (a state dict: .pth, .pt or .safetensors)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from n2vdb.errors import ModelError, WeightsUnavailable
from n2vdb.models import timm_models
from n2vdb.models.registry import IMAGENET_MEAN, IMAGENET_STD, build, preprocessing  # noqa: F401 - re-exported
from n2vdb.progress import say


@dataclass(frozen=True)
class LoadedModel:
    net: nn.Module
    weights_id: str  # recorded in the probe: 'imagenet:ALEXNET_...', 'random:seed=0', 'file:sha256=...'
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_checkpoint(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet(model: str, input_size: int | None) -> LoadedModel:
    if timm_models.is_timm(model):
        path = timm_models.pretrained_file(model)
        try:
            net = build(model, input_size, pretrained_file=str(path))
        except RuntimeError as exc:  # load_state_dict's complaint
            first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
            raise ModelError(f"weights in {path} do not fit {model}: {first[:200]}") from None
        return _loaded(model, net, f"imagenet:{timm_models.weights_tag(model)}")
    entry = torchvision.models.get_model_weights(model).DEFAULT
    cached = hub_checkpoint(entry.url)
    if not cached.exists():
        try:
            say(f"downloading {entry.url} to {cached}")
            with contextlib.redirect_stdout(io.StringIO()):  # torch.hub says the same on stdout, the data stream
                torch.hub.load_state_dict_from_url(entry.url, progress=True, check_hash=False)
        except Exception:  # noqa: BLE001 - any download failure means the same thing to the user
            raise WeightsUnavailable(
                f"cannot download {entry.url}; put that file at {cached} (TORCH_HOME sets the cache directory)"
            ) from None
    net = build(model, input_size)
    state = torch.load(cached, map_location="cpu", weights_only=True)
    _load(net, state, str(cached))
    return _loaded(model, net, f"imagenet:{entry}")


def _loaded(model: str, net: nn.Module, weights_id: str) -> LoadedModel:
    prep = preprocessing(model)
    return LoadedModel(net, weights_id, prep.mean, prep.std)


def _random(model: str, seed: int, input_size: int | None) -> LoadedModel:
    torch.manual_seed(seed)
    return _loaded(model, build(model, input_size), f"random:seed={seed}")


def _read_state(path: Path):
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise ModelError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    except Exception as exc:  # noqa: BLE001 - pickle, zip and tensor errors alike
        with path.open("rb") as handle:
            head = handle.read(2)
        if head != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
            raise ModelError(f"cannot read weights file {path}: not a PyTorch state dict (torch.save file)") from None
        raise ModelError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None


def _from_file(model: str, path: Path, input_size: int | None) -> LoadedModel:
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    state = _read_state(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # A Places365 AlexNet has 365 outputs: size the classifier from the file.
    last_2d = [v for v in state.values() if hasattr(v, "dim") and v.dim() == 2]
    kwargs = {"num_classes": last_2d[-1].shape[0]} if last_2d else {}
    try:
        net = build(model, input_size, **kwargs)
    except TypeError:
        net = build(model, input_size)
    _load(net, state, str(path))
    return _loaded(model, net, identify(model, str(path))[0])


def _load(net: nn.Module, state: dict, source: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise ModelError(f"weights in {source} do not fit {type(net).__name__}: {first[:200]}") from None


def load(model: str, weights: str = "imagenet", seed: int = 0, input_size: int | None = None) -> LoadedModel:
    if weights == "imagenet":
        loaded = _imagenet(model, input_size)
    elif weights == "random":
        loaded = _random(model, seed, input_size)
    else:
        loaded = _from_file(model, Path(weights).expanduser(), input_size)
    loaded.net.eval()
    return loaded


def identify(model: str, weights: str = "imagenet", seed: int = 0) -> tuple[str, tuple, tuple]:
    """(weights id, mean, std) without building the network: enough to key a probe. Mean and std are
    those of the model's default weights (registry.preprocessing), whichever weights are chosen."""
    prep = preprocessing(model)
    if weights == "imagenet":
        if timm_models.is_timm(model):
            return f"imagenet:{timm_models.weights_tag(model)}", prep.mean, prep.std
        return f"imagenet:{torchvision.models.get_model_weights(model).DEFAULT}", prep.mean, prep.std
    if weights == "random":
        return f"random:seed={seed}", prep.mean, prep.std
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(
            f"weights {weights}: expected imagenet, random or an existing state-dict file", param="weights"
        )
    return f"file:{path.name}:sha256={_file_sha256(path)[:16]}", prep.mean, prep.std
