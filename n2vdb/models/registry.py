"""Models by name (torchvision's classification zoo; `timm:NAME` with the timm extra), the layers people
dissect by friendly name (any dotted module path works too), what each layer puts out, and the
preprocessing that the weights' own metadata asks for."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torchvision
from torch import nn

from n2vdb.errors import ModelError
from n2vdb.models import layers, timm_models


@dataclass(frozen=True)
class LayerSpec:
    model: str
    name: str  # what the user typed (friendly or dotted)
    module: str  # dotted module path inside the torchvision model
    relu: bool = False  # apply a ReLU to the hooked output (densenet's features end at a BatchNorm)
    layout: layers.Layout = layers.Layout("map")  # how its output reads as [B, K, H, W]
    shape: tuple[int, ...] = ()  # its raw output shape, without the batch


@dataclass(frozen=True)
class Preprocess:
    """Whole image resized to size x size (no crop: masks stay aligned), normalised with mean and std."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # bilinear | bicubic | nearest | lanczos (PIL's resampling filters)


_VGG16 = dict(
    zip(
        [
            "conv1_1",
            "conv1_2",
            "conv2_1",
            "conv2_2",
            "conv3_1",
            "conv3_2",
            "conv3_3",
            "conv4_1",
            "conv4_2",
            "conv4_3",
            "conv5_1",
            "conv5_2",
            "conv5_3",
        ],
        [f"features.{i}" for i in (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)],
    )
)
_RESNET = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
_GOOGLENET = {
    n: n
    for n in (
        "inception3a",
        "inception3b",
        "inception4a",
        "inception4b",
        "inception4c",
        "inception4d",
        "inception4e",
        "inception5a",
        "inception5b",
    )
}

_STAGES = {f"stage{i}": f"features.{2 * i - 1}" for i in range(1, 5)}  # Swin and ConvNeXt: between downsamplings
_VIT_DEPTH = {"vit_b_16": 12, "vit_b_32": 12, "vit_l_16": 24, "vit_l_32": 24, "vit_h_14": 32}

# Post-ReLU outputs, as Network Dissection and Net2Vec probe them.
FRIENDLY: dict[str, dict[str, str]] = {
    "alexnet": {
        **{f"conv{i + 1}": f"features.{j}" for i, j in enumerate((1, 4, 7, 9, 11))},
        "fc6": "classifier.2",
        "fc7": "classifier.5",
    },
    "vgg16": {**_VGG16, "fc6": "classifier.1", "fc7": "classifier.4"},
    "resnet18": _RESNET,
    "resnet50": _RESNET,
    "resnet152": _RESNET,
    "googlenet": _GOOGLENET,
    "densenet161": {"features": "features"},
    **{m: {f"block{i}": f"encoder.layers.encoder_layer_{i}" for i in range(n)} for m, n in _VIT_DEPTH.items()},
    **{
        m: _STAGES
        for m in (
            "swin_t",
            "swin_s",
            "swin_b",
            "swin_v2_t",
            "swin_v2_s",
            "swin_v2_b",
            "convnext_tiny",
            "convnext_small",
            "convnext_base",
            "convnext_large",
        )
    },
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
    if timm_models.is_timm(model):
        return timm_models.check(model)
    models = all_models()
    if model not in models:
        hint = _close(model, models) or " (timm models are named timm:NAME)"
        raise ModelError(f"unknown model {model!r}{hint} (`n2vdb models` lists them)")
    return model


def build(model: str, input_size: int | None = None, **kwargs) -> nn.Module:
    """A model with its constructor's initialisation (weights are loaded by n2vdb.models.weights).
    INPUT_SIZE, when not the model's own, goes to the ViTs that are built for one size."""
    check_model(model)
    if timm_models.is_timm(model):
        return timm_models.build(model, input_size, **kwargs)
    if model in ("googlenet", "inception_v3"):
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    if model.startswith("vit_") and input_size and input_size != preprocessing(model).size:
        kwargs.setdefault("image_size", input_size)
    return torchvision.models.get_model(model, weights=None, **kwargs)


def _module_path(model: str, layer: str, net: nn.Module) -> str:
    friendly = FRIENDLY.get(model, {})
    if layer in friendly:
        return friendly[layer]
    try:
        net.get_submodule(layer)
    except AttributeError:
        options = list(friendly) + [n for n, _ in net.named_modules() if n]
        raise ModelError(
            f"model {model} has no layer {layer!r}{_close(layer, options)} (`n2vdb models {model}` lists them)"
        ) from None
    return layer


def resolve_layer(model: str, layer: str, size: int | None = None, net: nn.Module | None = None) -> LayerSpec:
    """The layer's module and how its output reads as maps (one forward pass of a blank image)."""
    check_model(model)
    size = size or input_size(model)
    net = net if net is not None else build(model, size)
    module = _module_path(model, layer, net)
    layout, shape = layers.describe(net, module, size, f"{model}")
    return LayerSpec(model, layer, module, relu=(model, layer) in _NEEDS_RELU, layout=layout, shape=shape)


_PIL_NAMES = {"bilinear", "bicubic", "nearest", "lanczos"}


def preprocessing(model: str) -> Preprocess:
    """From the metadata of the model's default weights (torchvision's transforms, timm's data config),
    whichever weights are loaded: random and file weights are preprocessed as the pretrained ones."""
    if timm_models.is_timm(model):
        config = timm_models.data_config(model)
        interpolation = config.get("interpolation", "bilinear")
        return Preprocess(
            int(config["input_size"][-1]),
            tuple(config["mean"]),
            tuple(config["std"]),
            interpolation if interpolation in _PIL_NAMES else "bilinear",
        )
    try:
        transforms = torchvision.models.get_model_weights(model).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        transforms = None
    size = DEFAULT_INPUT_SIZE.get(model) or int(getattr(transforms, "crop_size", [224])[0])
    mean = tuple(getattr(transforms, "mean", IMAGENET_MEAN))
    std = tuple(getattr(transforms, "std", IMAGENET_STD))
    mode = getattr(getattr(transforms, "interpolation", None), "value", "bilinear")
    return Preprocess(size, mean, std, mode if mode in _PIL_NAMES else "bilinear")


def input_size(model: str) -> int:
    return preprocessing(model).size


def listed_modules(model: str, net: nn.Module) -> dict[str, str]:
    """name -> module path for `n2vdb models MODEL`: friendly layers, every module two levels deep, and the
    repeated blocks (members of a Sequential, ModuleList or ModuleDict of one class) four levels deep."""
    listed = dict(FRIENDLY.get(model, {}))
    shown = set(listed.values())
    for path, _module in net.named_modules():
        depth = path.count(".") + 1 if path else 0
        if not path or path in shown or depth > 4:
            continue
        parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
        siblings = list(parent.children())
        repeated = (
            isinstance(parent, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
            and len(siblings) > 1
            and len({type(m) for m in siblings}) == 1
        )
        if depth <= 2 or repeated:
            listed[path] = path
            shown.add(path)
    return listed


def layer_table(model: str, size: int | None = None) -> list[dict]:
    """One row per listed layer: name, module, raw output shape, kind and the [K, H, W] it is stored as."""
    check_model(model)
    size = size or input_size(model)
    net = build(model, size).eval()
    names = listed_modules(model, net)
    described = layers.describe_many(net, list(dict.fromkeys(names.values())), size, model)
    rows = []
    for name, path in names.items():
        layout, shape = described[path]
        supported = isinstance(layout, layers.Layout)
        rows.append(
            {
                "layer": name,
                "module": path,
                "output": "x".join(str(d) for d in shape),
                "kind": layout.kind if supported else "unsupported",
                "stored": "x".join(str(d) for d in layers.stored_shape(layout, shape)) if supported else "",
                "note": layout.describe() if supported else "",
            }
        )
    return rows


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
