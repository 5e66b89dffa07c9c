"""What a layer puts out, and how n2vdb reads it as K maps of H x W, the form every stage stores.

Three kinds of output, found by one forward pass of a blank image (`describe`):

- map     [B, K, H, W], as CNNs give it. Channels-last outputs [B, H, W, K] (torchvision's Swin and the
          inside of ConvNeXt blocks, timm's Swin) are recognised and transposed.
- tokens  [B, N, D], as vision transformers give it. The model's own class, distillation and register
          tokens (timm: `num_prefix_tokens`; torchvision's ViT: its class token) come first and are left
          out; the other N - prefix tokens are the patch grid in row-major order (patch (r, c) is token
          prefix + r * gw + c), reshaped to [B, D, gh, gw]. Every stage then treats D as units.
- vector  [B, D] (or a 1 x 1 map, e.g. a global pool): stored as [B, D, 1, 1]; a vector has no
          spatial extent, so only classification embeddings apply to it.

Which axis of a 4-D output holds the channels is read off the model: when it also runs at a second
input size, the two axes that grow with the input are the spatial ones (true of any model, whatever
permutes its blocks do inside). For models built for one input size (timm's ViT and Swin, MaxViT),
the map of a square image is square, which places the channels unless K equals the side; then a
Conv2d puts channels first and otherwise the model's declared `output_fmt` (timm) decides. Outputs
that fit neither (MaxViT's window partitions, B x windows x window pixels x C) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from n2vdb.errors import ModelError

KINDS = ("map", "tokens", "vector")


class UnsupportedLayer(ModelError):
    pass


@dataclass(frozen=True)
class Layout:
    kind: str  # map | tokens | vector
    channels_last: bool = False  # map only: the output is [B, H, W, K]
    prefix_tokens: int = 0  # tokens only: class / distillation / register tokens before the patches
    grid: tuple[int, int] | None = None  # tokens only: the patch grid (gh, gw)

    def encode(self) -> str:
        """The probe's `layout` setting: nchw | nhwc | tokens:PREFIX:GHxGW | vector."""
        if self.kind == "map":
            return "nhwc" if self.channels_last else "nchw"
        if self.kind == "tokens":
            return f"tokens:{self.prefix_tokens}:{self.grid[0]}x{self.grid[1]}"
        return "vector"

    @classmethod
    def decode(cls, text: str) -> Layout:
        if text in ("nchw", "nhwc"):
            return cls("map", channels_last=text == "nhwc")
        if text == "vector":
            return cls("vector")
        _, prefix, grid = text.split(":")
        gh, gw = grid.split("x")
        return cls("tokens", prefix_tokens=int(prefix), grid=(int(gh), int(gw)))

    def describe(self) -> str:
        if self.kind == "map":
            return "channels-last, transposed" if self.channels_last else ""
        if self.kind == "tokens":
            gh, gw = self.grid
            special = f"first {self.prefix_tokens} token(s) left out, " if self.prefix_tokens else ""
            return f"{special}{gh}x{gw} patch grid"
        return "classification embeddings only"


def first_tensor(output) -> torch.Tensor | None:
    """A module's output, or the first tensor of a tuple (attention modules return (output, weights))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def to_maps(out: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A layer's output [B, ...] -> [B, K, H, W] as LAYOUT reads it."""
    if layout.kind == "vector":
        return out.flatten(1)[:, :, None, None]
    if layout.kind == "map":
        return out.permute(0, 3, 1, 2) if layout.channels_last else out
    gh, gw = layout.grid
    patches = out[:, layout.prefix_tokens :, :]
    return patches.reshape(out.shape[0], gh, gw, out.shape[2]).permute(0, 3, 1, 2)


def prefix_tokens(net: nn.Module) -> int:
    """How many non-patch tokens lead the model's token sequences."""
    if hasattr(net, "num_prefix_tokens"):  # timm: class + distillation + register tokens
        return int(net.num_prefix_tokens)
    if hasattr(net, "class_token") and hasattr(net, "patch_size"):  # torchvision's VisionTransformer
        return 1
    return 0


def patch_grid(net: nn.Module, size: int) -> tuple[int, int] | None:
    """The model's patch grid at SIZE x SIZE input, where it declares one."""
    grid = getattr(getattr(net, "patch_embed", None), "grid_size", None)  # timm, for its built size
    if grid is not None and getattr(net.patch_embed, "img_size", None) in ((size, size), None):
        return int(grid[0]), int(grid[1])
    if hasattr(net, "class_token") and hasattr(net, "patch_size"):
        return size // net.patch_size, size // net.patch_size
    return None


def _unsupported(where: str, shape: tuple[int, ...], why: str = "") -> UnsupportedLayer:
    return UnsupportedLayer(
        f"{where} puts out shape {tuple(shape)}{why}, which n2vdb cannot read as a map (B,K,H,W or B,H,W,K), "
        "tokens (B,N,D) or a vector (B,D); choose another layer (`n2vdb models MODEL` lists layers and kinds)"
    )


def _channels_axis(
    net: nn.Module, module: nn.Module, shape: tuple[int, ...], other: tuple[int, ...] | None, where: str
) -> int:
    """1 or 3: where a 4-D output keeps its channels."""
    grew = {axis for axis in (1, 2, 3) if other is not None and shape[axis] != other[axis]}
    if grew == {2, 3}:
        return 1
    if grew == {1, 2}:
        return 3
    if grew:
        raise _unsupported(where, shape, " (its spatial axes are not next to each other)")
    # One input size only, or an output of fixed size (adaptive pooling). The image is square, so a
    # map's spatial axes are equal: that places the channels unless K equals the side, and then the
    # module (a Conv2d puts channels first) or the model's declared output_fmt (timm) decides.
    first, last = shape[2] == shape[3], shape[1] == shape[2]
    if first != last:
        return 1 if first else 3
    if not first:
        raise _unsupported(where, shape, " (no two axes form a square map of a square image)")
    if isinstance(module, nn.Conv2d):
        return 1
    return 3 if str(getattr(net, "output_fmt", "NCHW")).upper().endswith("NHWC") else 1


def classify(
    net: nn.Module,
    module: nn.Module,
    shape: tuple[int, ...],
    other: tuple[int, ...] | None,
    size: int,
    batch: int,
    where: str,
) -> Layout:
    """The layout of an output of SHAPE at SIZE px; OTHER = its shape at a second input size, if the model ran."""
    if len(shape) < 2 or shape[0] != batch:
        raise _unsupported(where, shape, f" (not one row per image of a batch of {batch})")
    if len(shape) == 2 or (len(shape) == 4 and shape[2] * shape[3] == 1):
        return Layout("vector")
    if len(shape) == 4:
        axis = _channels_axis(net, module, shape, other, where)
        spatial = shape[2:] if axis == 1 else shape[1:3]
        return Layout("vector") if spatial[0] * spatial[1] == 1 else Layout("map", channels_last=axis == 3)
    if len(shape) == 3:
        n = shape[1]
        grid = patch_grid(net, size)
        for prefix in dict.fromkeys((prefix_tokens(net), 0)):  # a patch embedding has no prefix tokens yet
            patches = n - prefix
            if grid is None and patches > 0 and math.isqrt(patches) ** 2 == patches:
                grid = (math.isqrt(patches), math.isqrt(patches))
            if grid is not None and grid[0] * grid[1] == patches:
                return Layout("tokens", prefix_tokens=prefix, grid=grid)
        raise _unsupported(where, shape, f" ({n} tokens fit no patch grid{f' {grid}' if grid else ''})")
    raise _unsupported(where, shape)


class _StopForward(Exception):
    pass


class LayerTap:
    """Runs a model only as far as one module and returns that module's output, read as maps
    [B, K, H, W] when a layout is given (raw otherwise)."""

    def __init__(self, net: nn.Module, module: str, relu: bool, layout: Layout | None = None):
        self.net, self.relu, self.layout = net, relu, layout
        self.output: torch.Tensor | None = None
        self.handle = net.get_submodule(module).register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        self.output = first_tensor(output)
        raise _StopForward

    @torch.no_grad()
    def drop_unreached(self, sample: torch.Tensor) -> int:
        """Free the weights the tap never reaches (AlexNet's classifier is 230 MB of its 244 MB at
        conv5): running SAMPLE once, the parameters and buffers held only by modules that never
        start move to the meta device (no memory). Kept only if SAMPLE then gives the same output
        as before, bit for bit (a model that reads a module's weights without calling it fails that
        and keeps them all). Returns the bytes freed."""
        started: set[int] = set()
        modules = list(self.net.modules())
        hooks = [m.register_forward_pre_hook(lambda module, _args: started.add(id(module))) for m in modules]
        try:
            before = self(sample)
        finally:
            for hook in hooks:
                hook.remove()
        reached = {id(t) for m in modules if id(m) in started for t in (*m.parameters(False), *m.buffers(False))}
        dropped = []  # (store, name, original)
        for m in modules:
            if id(m) in started:
                continue
            for store in (m._parameters, m._buffers):
                for name, tensor in store.items():
                    if tensor is not None and id(tensor) not in reached:
                        dropped.append((store, name, tensor))
        for store, name, tensor in dropped:
            empty = torch.empty_like(tensor, device="meta")
            store[name] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
        # A read of a meta weight need not fail: a CPU conv2d given one returns a CPU tensor of whatever
        # it finds, which once equalled the output before (a flaky failure in tests/test_backbones.py),
        # so the check also watches every torch call for them.
        watch = _Reads(t for store, name, _ in dropped for t in [store[name]])
        try:
            with watch:
                same = torch.equal(self(sample), before)
        except Exception:  # noqa: BLE001 (a dropped weight was read after all)
            same = False
        same = same and not watch.read
        if not same:
            for store, name, tensor in dropped:
                store[name] = tensor
            return 0
        return sum(t.numel() * t.element_size() for _, _, t in dropped)

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        try:
            self.net(batch)
        except _StopForward:
            pass
        out = self.output
        self.output = None
        if out is None:
            raise ModelError("the layer returned no tensor, or the model never reached it")
        if self.layout is not None:
            out = to_maps(out, self.layout)
        return torch.relu(out) if self.relu else out


class _Reads(torch.overrides.TorchFunctionMode):
    """Records whether any torch function or tensor method is given one of the WATCHED tensors."""

    def __init__(self, watched) -> None:
        super().__init__()
        self.watched = {id(t) for t in watched}
        self.read = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.read:
            self.read = any(id(leaf) in self.watched for leaf in _leaves((args, kwargs)))
        return func(*args, **kwargs)


def _leaves(value):
    """The non-container values inside nested tuples, lists and dicts (a torch call's arguments)."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def _run(net: nn.Module, size: int, batch: int, where: str) -> None:
    try:
        with torch.no_grad():
            net(torch.zeros(batch, 3, size, size))
    except _StopForward:
        pass
    except Exception as exc:  # noqa: BLE001 - a model refusing an input size says so in many ways
        raise ModelError(
            f"{where} does not run on {size} px input: {str(exc).splitlines()[0][:160]}; try --input-size"
        ) from None


def describe(net: nn.Module, module: str, size: int, where: str) -> tuple[Layout, tuple[int, ...]]:
    """(layout, raw output shape without the batch) of MODULE at SIZE x SIZE input."""
    return describe_many(net, [module], size, where)[module]


def describe_many(
    net: nn.Module, modules: list[str], size: int, where: str
) -> dict[str, tuple[Layout | UnsupportedLayer, tuple[int, ...]]]:
    """describe for several modules in one pass (two for 4-D outputs): an unsupported one maps to its error,
    except when only one module is asked for, which raises it."""
    batch = 2  # not 1, so that a batch axis can be told from a squeezed one
    shapes: dict[str, tuple[int, ...]] = {}
    last = modules[0] if len(modules) == 1 else None

    def recorder(path, store):
        def hook(_m, _i, output):
            out = first_tensor(output)
            store[path] = tuple(out.shape) if out is not None else ()
            if path == last:
                raise _StopForward

        return hook

    def forward(at: int, store: dict) -> bool:
        handles = [net.get_submodule(p).register_forward_hook(recorder(p, store)) for p in modules]
        try:
            _run(net, at, batch, where)
            return True
        except ModelError:
            if store is shapes:
                raise
            return False
        finally:
            for handle in handles:
                handle.remove()

    net.eval()
    forward(size, shapes)
    others: dict[str, tuple[int, ...]] = {}
    if any(len(s) == 4 for s in shapes.values()):
        forward(size + 32, others) or others.clear()
    result: dict = {}
    for path in modules:
        shape = shapes.get(path)
        name = f"{where} layer {path}"
        if shape is None:
            error: ModelError = ModelError(f"{name} never runs in the model's forward pass; choose another layer")
            result[path] = (error, ())
        else:
            try:
                result[path] = (
                    classify(net, net.get_submodule(path), shape, others.get(path), size, batch, name),
                    shape[1:],
                )
            except UnsupportedLayer as exc:
                result[path] = (exc, shape[1:])
        if len(modules) == 1 and isinstance(result[path][0], ModelError):
            raise result[path][0]
    return result


def stored_shape(layout: Layout, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(K, H, W) as stored, from the raw output shape without the batch."""
    return tuple(to_maps(torch.empty(1, *shape, device="meta"), layout).shape[1:])
