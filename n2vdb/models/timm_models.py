"""timm models, named `timm:NAME` (the optional extra: pip install 'n2vdb[timm]').

Preprocessing comes from the pretrained config of the name's default weights (timm's
resolve_data_config): input size, mean, std and interpolation; its centre crop is not used.
'imagenet' weights are those default weights, read from the Hugging Face cache (where timm keeps
them) or downloaded there; offline, the error names the file and the cache.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from n2vdb.errors import ModelError, WeightsUnavailable

PREFIX = "timm:"
WEIGHTS_FILE = "model.safetensors"


def is_timm(model: str) -> bool:
    return model.startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need the timm package: pip install 'n2vdb[timm]' (or pip install timm)") from None
    return timm


def name_of(model: str) -> str:
    return model.removeprefix(PREFIX)


def check(model: str) -> str:
    timm = _timm()
    name = name_of(model)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ModelError(f"unknown timm model {name!r}{hint} (`n2vdb models 'timm:*vit*'` lists names)")
    return model


def list_models(pattern: str) -> list[str]:
    return [PREFIX + n for n in _timm().list_models(name_of(pattern) or "*")]


def _pretrained_cfg(model: str):
    return _timm().models.get_pretrained_cfg(name_of(model))


def data_config(model: str) -> dict:
    """timm's data config for the name's default weights: input_size, interpolation, mean, std, crop_pct, ..."""
    timm = _timm()
    cfg = _pretrained_cfg(model)
    return timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})


def build(model: str, input_size: int | None = None, pretrained_file: str | None = None, **kwargs) -> nn.Module:
    """A timm model; INPUT_SIZE other than its own is passed as img_size to the models that take one."""
    timm = _timm()
    name = name_of(check(model))
    if input_size is not None and input_size != data_config(model)["input_size"][-1]:
        kwargs["img_size"] = input_size
    if pretrained_file is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": pretrained_file})
    try:
        return timm.create_model(name, **kwargs)
    except TypeError:
        if "img_size" not in kwargs:
            raise
        kwargs.pop("img_size")  # a model of any input size (a CNN) takes no img_size
        return timm.create_model(name, **kwargs)


def weights_tag(model: str) -> str:
    cfg = _pretrained_cfg(model)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsUnavailable(
            f"timm knows no pretrained weights for {name_of(model)}; pass --weights FILE or --weights random"
        )
    return cfg.hf_hub_id or name_of(model)


def pretrained_file(model: str) -> Path:
    """The default weights' file in the Hugging Face cache, downloading it there when it is missing."""
    cfg = _pretrained_cfg(model)
    repo = weights_tag(model)
    if not cfg.hf_hub_id:
        raise WeightsUnavailable(
            f"timm's weights for {name_of(model)} live at {cfg.url}; download that file and pass it with --weights FILE"
        )
    import huggingface_hub
    from huggingface_hub import constants

    cached = huggingface_hub.try_to_load_from_cache(repo, WEIGHTS_FILE)
    if isinstance(cached, str):
        return Path(cached)
    try:
        return Path(huggingface_hub.hf_hub_download(repo, WEIGHTS_FILE))
    except Exception:  # noqa: BLE001 - offline, proxy, missing file: the same to the user
        raise WeightsUnavailable(
            f"cannot download https://huggingface.co/{repo}/resolve/main/{WEIGHTS_FILE}; put it in the Hugging "
            f"Face cache ({constants.HF_HUB_CACHE}, e.g. `huggingface-cli download {repo} {WEIGHTS_FILE}`) or "
            "pass it with --weights FILE (HF_HUB_OFFLINE=1 skips the download attempts)"
        ) from None
