"""Which layers people dissect, by friendly name, for torchvision models; any dotted module path works too."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from n2vdb.errors import ModelError


@dataclass(frozen=True)
class LayerSpec:
    model: str
    name: str  # what the user typed (friendly or dotted)
    module: str  # dotted module path inside the torchvision model
    relu: bool = False  # apply a ReLU to the hooked output (densenet's features end at a BatchNorm)


_VGG16 = dict(zip(
    ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
     "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"],
    [f"features.{i}" for i in (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)],
))
_RESNET = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
_GOOGLENET = {n: n for n in ("inception3a", "inception3b", "inception4a", "inception4b", "inception4c",
                             "inception4d", "inception4e", "inception5a", "inception5b")}

# Post-ReLU outputs, as Network Dissection and Net2Vec probe them.
FRIENDLY: dict[str, dict[str, str]] = {
    "alexnet": {f"conv{i + 1}": f"features.{j}" for i, j in enumerate((1, 4, 7, 9, 11))},
    "vgg16": _VGG16,
    "resnet18": _RESNET, "resnet50": _RESNET, "resnet152": _RESNET,
    "googlenet": _GOOGLENET,
    "densenet161": {"features": "features"},
}
_NEEDS_RELU = {("densenet161", "features")}

# Net2Vec's reference numbers for AlexNet use 227 px inputs; the others use 224.
DEFAULT_INPUT_SIZE = {"alexnet": 227}


def all_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _close(word: str, options: list[str]) -> str:
    matches = difflib.get_close_matches(word, options, n=5, cutoff=0.5)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def check_model(model: str) -> str:
    models = all_models()
    if model not in models:
        raise ModelError(f"unknown model {model!r}{_close(model, models)} (`n2vdb models` lists them)")
    return model


def build(model: str, **kwargs) -> nn.Module:
    """An uninitialised-weights torchvision model (weights are loaded by n2vdb.models.weights)."""
    check_model(model)
    if model in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    return torchvision.models.get_model(model, weights=None, **kwargs)


def resolve_layer(model: str, layer: str, net: nn.Module | None = None) -> LayerSpec:
    check_model(model)
    friendly = FRIENDLY.get(model, {})
    if layer in friendly:
        return LayerSpec(model, layer, friendly[layer], relu=(model, layer) in _NEEDS_RELU)
    net = net if net is not None else build(model)
    try:
        net.get_submodule(layer)
    except AttributeError:
        options = list(friendly) + [n for n, _ in net.named_modules() if n]
        raise ModelError(f"model {model} has no layer {layer!r}{_close(layer, options)} "
                         f"(`n2vdb models {model}` lists them)") from None
    return LayerSpec(model, layer, layer)


def input_size(model: str) -> int:
    return DEFAULT_INPUT_SIZE.get(model, 224)


def output_shapes(model: str, size: int | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(friendly name, module path, (K, H, W)) for each friendly layer of MODEL, by a dummy forward pass."""
    net = build(model).eval()
    layers = FRIENDLY.get(model) or {name: name for name, _ in net.named_children()}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [net.get_submodule(path).register_forward_hook(
        lambda _m, _i, out, path=path: shapes.__setitem__(path, tuple(out.shape[1:])))
        for path in set(layers.values())]
    size = size or input_size(model)
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return [(name, path, shapes.get(path, ())) for name, path in layers.items()]
