"""Any backbone: layer outputs read as maps, tokens or vectors, proven on tiny models built here."""

import duckdb
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from n2vdb import api, queries
from n2vdb.data.broden import BrodenDataset
from n2vdb.errors import ModelError, WeightsUnavailable
from n2vdb.extract import ImageFolderRows
from n2vdb.models import layers, registry, weights
from n2vdb.probe import TrainSettings

from helpers import run_cli

FAST = TrainSettings(epochs=1)


def raw_output(net: torch.nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    """The module's output by a plain forward hook, for checking what LayerTap makes of it."""
    seen = []
    handle = net.get_submodule(module).register_forward_hook(lambda _m, _i, out: seen.append(layers.first_tensor(out)))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0]


def tapped(net: torch.nn.Module, module: str, x: torch.Tensor, size: int) -> tuple[layers.Layout, torch.Tensor]:
    layout, _ = layers.describe(net, module, size, "test model")
    tap = layers.LayerTap(net, module, False, layout)
    try:
        return layout, tap(x)
    finally:
        tap.handle.remove()


# -- token sequences -------------------------------------------------------------------------------


def tiny_torchvision_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    ).eval()


def test_torchvision_vit_tokens_land_on_their_patch_and_the_class_token_is_left_out():
    net = tiny_torchvision_vit()
    x = torch.randn(3, 3, 32, 32)
    layout, maps = tapped(net, "encoder.layers.encoder_layer_1", x, 32)
    assert layout == layers.Layout("tokens", prefix_tokens=1, grid=(4, 4))
    tokens = raw_output(net, "encoder.layers.encoder_layer_1", x)
    assert tokens.shape == (3, 17, 16) and maps.shape == (3, 16, 4, 4)
    for row in range(4):
        for col in range(4):  # token 1 + 4 * row + col is patch (row, col); token 0 is the class token
            assert torch.equal(maps[:, :, row, col], tokens[:, 1 + 4 * row + col, :])
    # the class token's vector is nowhere in the grid
    assert not any(torch.allclose(maps[0, :, r, c], tokens[0, 0]) for r in range(4) for c in range(4))


def test_one_lit_patch_appears_at_its_row_and_column():
    """Before attention mixes tokens, only the patch that differs in the image differs in the grid."""
    net = tiny_torchvision_vit()
    with torch.no_grad():
        net.encoder.pos_embedding.zero_()
        net.class_token.fill_(1e3)  # would dominate any map it leaked into
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 8:16, 16:24] = 1.0  # patch row 1, column 2
    _, maps = tapped(net, "encoder.dropout", x, 32)
    differs = (maps[0] - maps[0, :, 0:1, 0:1]).abs().sum(dim=0) > 1e-6
    assert differs.nonzero().tolist() == [[1, 2]]
    assert maps.abs().max() < 1e2


def tiny_timm_vit(**kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, reg_tokens=3, num_classes=5, **kwargs
    ).eval()


def test_timm_vit_register_and_class_tokens_are_left_out_and_match_timms_own_grid():
    net = tiny_timm_vit()
    assert net.num_prefix_tokens == 4  # class token + 3 registers
    x = torch.randn(2, 3, 32, 32)
    layout, maps = tapped(net, "blocks.1", x, 32)
    assert layout == layers.Layout("tokens", prefix_tokens=4, grid=(4, 4))
    tokens = raw_output(net, "blocks.1", x)
    for row in range(4):
        for col in range(4):
            assert torch.equal(maps[:, :, row, col], tokens[:, 4 + 4 * row + col, :])
    # timm's own intermediate-feature API, which drops its prefix tokens and reshapes to NCHW, agrees
    timm_maps = net.forward_intermediates(x, indices=[1], output_fmt="NCHW", intermediates_only=True)[0]
    assert torch.allclose(maps, timm_maps)


def test_timm_patch_embedding_has_no_prefix_tokens():
    net = tiny_timm_vit()
    layout, maps = tapped(net, "patch_embed", torch.randn(1, 3, 32, 32), 32)
    assert layout == layers.Layout("tokens", prefix_tokens=0, grid=(4, 4)) and maps.shape == (1, 16, 4, 4)


# -- channels-last maps ----------------------------------------------------------------------------


def test_torchvision_convnext_block_internals_are_channels_last():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    net = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    inner = "features.1.0.block.3"  # the block's first Linear, between its Permute modules
    layout, maps = tapped(net, inner, x, 64)
    assert layout == layers.Layout("map", channels_last=True)
    raw = raw_output(net, inner, x)
    assert raw.shape == (2, 16, 16, 32) and maps.shape == (2, 32, 16, 16)
    assert torch.equal(maps[:, 5, 3, 7], raw[:, 3, 7, 5])
    layout, maps = tapped(net, "features.1.0", x, 64)  # the block's output is channels-first again
    assert layout == layers.Layout("map") and torch.equal(maps, raw_output(net, "features.1.0", x))


def test_timm_convnext_and_fixed_size_swin_channels():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    convnext = timm.models.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    assert tapped(convnext, "stages.1.blocks.0.mlp", x, 64)[0].channels_last  # permuted inline by timm
    layout, maps = tapped(convnext, "stages.1", x, 64)
    assert layout == layers.Layout("map") and maps.shape == (2, 16, 8, 8)
    swin = timm.models.SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2), num_classes=5
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    layout, maps = tapped(swin, "layers.0", x, 32)  # Swin runs at one input size: its declared NHWC decides
    assert layout.channels_last
    assert torch.equal(maps, raw_output(swin, "layers.0", x).permute(0, 3, 1, 2))
    assert not tapped(swin, "patch_embed.proj", x, 32)[0].channels_last  # a Conv2d is channels first


# -- vectors and what cannot be read ---------------------------------------------------------------


def test_vectors_and_pooled_maps_are_vectors():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    for module in ("avgpool", "fc"):
        layout, maps = tapped(net, module, x, 64)
        assert layout == layers.Layout("vector")
        assert torch.equal(maps.flatten(1), raw_output(net, module, x).flatten(1)) and maps.shape[2:] == (1, 1)


class Odd(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.odd = torch.nn.Identity()

    def forward(self, x):
        return self.odd(self.conv(x).unsqueeze(1).expand(-1, 2, -1, -1, -1))


def test_unsupported_output_shape_is_one_clear_line():
    with pytest.raises(layers.UnsupportedLayer) as info:
        layers.describe(Odd().eval(), "odd", 16, "odd")
    message = str(info.value)
    assert "\n" not in message and "(2, 2, 4, 14, 14)" in message and "n2vdb models" in message


@pytest.mark.parametrize(
    "model,layer,message",
    [
        # MaxViT's window partition: batch x windows x pixels per window x C, no map of the image
        ("maxvit_t", "blocks.0.layers.0.layers.window_attention.partition_op", "puts out shape (2, 64, 49, 64)"),
        ("vit_b_16", "encoder.layers.encoder_layer_0.self_attention.out_proj", "never runs"),  # called as weights
    ],
)
def test_unsupported_layer_from_the_cli(tmp_path, model, layer, message):
    result = run_cli("ingest", model, layer, "--weights", "random", "--db", tmp_path / "x.duckdb")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "x.duckdb").exists() or api.probes(tmp_path / "x.duckdb").num_rows == 0


def test_listing_shows_kinds():
    rows = {r["layer"]: r for r in registry.layer_table("alexnet")}
    assert (rows["conv5"]["kind"], rows["conv5"]["stored"]) == ("map", "256x13x13")
    assert (rows["fc7"]["kind"], rows["fc7"]["output"], rows["fc7"]["stored"]) == ("vector", "4096", "4096x1x1")
    assert rows["classifier.4"]["kind"] == "vector"


# -- preprocessing from the weights' metadata ------------------------------------------------------


def test_preprocessing_from_torchvision_weights_metadata():
    swin = registry.preprocessing("swin_t")
    meta = torchvision.models.Swin_T_Weights.DEFAULT.transforms()
    assert (swin.size, swin.mean, swin.std, swin.interpolation) == (
        meta.crop_size[0],
        tuple(meta.mean),
        tuple(meta.std),
        "bicubic",
    )
    assert registry.preprocessing("inception_v3").size == 299
    assert registry.preprocessing("alexnet").size == 227  # Net2Vec's size, kept


def test_preprocessing_from_timm_data_config():
    timm = pytest.importorskip("timm")
    prep = registry.preprocessing("timm:vit_small_patch16_224")
    config = timm.data.resolve_data_config(
        pretrained_cfg=timm.models.get_pretrained_cfg("vit_small_patch16_224").to_dict()
    )
    assert (prep.size, prep.mean, prep.std, prep.interpolation) == (
        224,
        tuple(config["mean"]),
        tuple(config["std"]),
        config["interpolation"],
    )


def test_images_resized_with_the_weights_interpolation_without_a_crop(synthetic_dir):
    dataset = BrodenDataset.open(synthetic_dir)
    row = dataset.rows[0]
    rows = ImageFolderRows(dataset, [row], 50, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), interpolation="bicubic")
    _, tensor, error = rows[0]
    img = Image.open(dataset.image_path(row)).convert("RGB").resize((50, 50), Image.BICUBIC)
    expected = (np.asarray(img, np.float32) / 255 - 0.5) / 0.25
    assert error == "" and np.allclose(tensor.permute(1, 2, 0).numpy(), expected, atol=1e-6)


# -- timm weights ----------------------------------------------------------------------------------


def test_timm_unknown_name_and_offline_weights(monkeypatch):
    pytest.importorskip("timm")
    import huggingface_hub

    with pytest.raises(ModelError, match="did you mean timm:vit_small_patch16_224"):
        registry.check_model("timm:vit_smal_patch16_224")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsUnavailable) as info:
        weights.load("timm:resnet18", "imagenet")
    message = str(info.value)
    assert "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors" in message
    assert "\n" not in message and "--weights FILE" in message


def test_timm_weights_from_the_cache_from_a_file_and_seeded(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    import huggingface_hub
    from safetensors.torch import save_file

    torch.manual_seed(5)
    saved = timm.create_model("resnet18").state_dict()
    path = tmp_path / "model.safetensors"
    save_file(saved, str(path))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: str(path))
    cached = weights.load("timm:resnet18", "imagenet")
    assert cached.weights_id == "imagenet:timm/resnet18.a1_in1k"
    assert torch.equal(cached.net.state_dict()["layer4.1.conv2.weight"], saved["layer4.1.conv2.weight"])
    saved = timm.create_model("resnet18", num_classes=7).state_dict()  # a fine-tuned one: head sized from the file
    save_file(saved, str(path))
    from_file = weights.load("timm:resnet18", str(path))
    assert from_file.net.fc.out_features == 7
    assert torch.equal(from_file.net.state_dict()["conv1.weight"], saved["conv1.weight"])
    a, b, c = (weights.load("timm:resnet18", "random", seed=s).net.state_dict()["conv1.weight"] for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- whole probes ----------------------------------------------------------------------------------


def run_every_query(db) -> None:
    """Every named query answers (rows or none) for the newest probe, for both embedding kinds."""
    con = duckdb.connect(str(db), read_only=True)
    names = [n for (n,) in con.execute("SELECT name FROM concepts ORDER BY concept_id LIMIT 3").fetchall()]
    con.close()
    for query in queries.load_all().values():
        args = dict(zip([p.name for p in query.params if p.required], names))
        api.query(query.name, db, **args)
        if any(p.name == "kind" for p in query.params):
            api.query(query.name, db, kind="classification", **args)


def test_vector_layer_probe_has_classification_only_and_a_clean_database(tmp_path, synthetic_dir):
    db = tmp_path / "fc.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    probe = api.ingest("alexnet", "fc7", db, dataset="synthetic", weights="random", limit=24, workers=0, train=FAST)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT status, n_filters, height, width, settings->>'kind' FROM probes").fetchall() == [
        ("complete", 4096, 1, 1, "vector")
    ]
    kinds = dict(con.execute("SELECT kind, count(*) FROM embeddings GROUP BY kind").fetchall())
    assert set(kinds) == {"classification"} and kinds["classification"] > 0
    assert con.execute("SELECT count(*) FROM filter_concept_iou").fetchone()[0] == 0
    assert con.execute("SELECT DISTINCT method FROM image_concept_scores").fetchall() == [("classification",)]
    con.close()
    # the stored vector is fc7 itself (ReLU(classifier.4)), quantised within half a step
    torch.manual_seed(0)
    net = torchvision.models.alexnet().eval()
    dataset = BrodenDataset.open(synthetic_dir)
    images = torch.stack(
        [
            ImageFolderRows(dataset, dataset.rows[:4], 227, weights.IMAGENET_MEAN, weights.IMAGENET_STD)[i][1]
            for i in range(4)
        ]
    )
    with torch.no_grad():
        expected = net.classifier[:6](torch.flatten(net.avgpool(net.features(images)), 1)).numpy()
    _, got = api.activations(probe, db, image_ids=[0, 1, 2, 3])
    step = expected.max(axis=1, keepdims=True) / 255
    assert np.all(np.abs(got[:, :, 0, 0] - expected) <= step / 2 + 1e-5)
    from n2vdb.errors import UsageError

    with pytest.raises(UsageError, match="vector layer"):
        api.formulas(probe, db)
    assert all(r["violations"] == 0 for r in api.db_check(db).to_pylist())
    run_every_query(db)


TINY_CFG = dict(
    input_size=(3, 32, 32), mean=(0.3, 0.4, 0.5), std=(0.2, 0.25, 0.3), interpolation="bicubic", num_classes=5
)
default_cfgs = {"n2vdb_tiny_vit": TINY_CFG, "n2vdb_tiny_convnext": TINY_CFG}  # read by timm's register_model


@pytest.fixture(scope="module")
def tiny_timm_models():
    timm = pytest.importorskip("timm")

    def own(kwargs: dict) -> dict:  # what create_model passes that only its own builders take
        return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}

    def n2vdb_tiny_vit(pretrained=False, **kwargs):
        kwargs = own(kwargs)
        kwargs.setdefault("img_size", 32)
        return timm.models.VisionTransformer(patch_size=8, embed_dim=16, depth=2, num_heads=2, reg_tokens=2, **kwargs)

    def n2vdb_tiny_convnext(pretrained=False, **kwargs):
        kwargs = own(kwargs)
        kwargs.pop("img_size", None)
        return timm.models.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), **kwargs)

    for fn in (n2vdb_tiny_vit, n2vdb_tiny_convnext):
        fn.__module__ = __name__
        timm.models.register_model(fn)
    return "timm:n2vdb_tiny_vit", "timm:n2vdb_tiny_convnext"


def test_a_vit_and_a_cnn_compared_on_one_dataset(tmp_path, synthetic_dir, tiny_timm_models):
    vit, convnext = tiny_timm_models
    db = tmp_path / "both.duckdb"
    api.add_dataset(synthetic_dir, "synthetic", db)
    options = dict(dataset="synthetic", weights="random", limit=24, workers=0, train=FAST)
    vit_probe = api.ingest(vit, "blocks.1", db, **options)
    cnn_probe = api.ingest(convnext, "stages.1", db, input_size=64, **options)
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute(
        "SELECT probe_id, n_filters, height, width, settings->>'kind', settings->>'layout',"
        " settings->>'interpolation', settings->>'mean', settings->>'input_size'"
        " FROM probes ORDER BY probe_id"
    ).fetchall()
    con.close()
    assert rows == [
        (vit_probe, 16, 4, 4, "tokens", "tokens:3:4x4", "bicubic", "[0.3,0.4,0.5]", "32"),
        (cnn_probe, 16, 8, 8, "map", "nchw", "bicubic", "[0.3,0.4,0.5]", "64"),
    ]
    assert all(r["violations"] == 0 for r in api.db_check(db).to_pylist())
    overall = {r["probe_id"]: r for r in api.query("compare-layers", db).to_pylist() if r["category"] == "all"}
    assert set(overall) == {vit_probe, cnn_probe}
    con = duckdb.connect(str(db), read_only=True)
    pixel = {c for (c,) in con.execute("SELECT concept_id FROM concepts WHERE level = 'pixel'").fetchall()}
    for probe_id, row in overall.items():  # each mean recomputed here from the stored rows
        iou = {
            (f, c, split): v
            for f, c, split, v in con.execute(
                "SELECT filter, concept_id, split, iou FROM filter_concept_iou WHERE probe_id = ?", [probe_id]
            ).fetchall()
        }
        singles = []
        for c in pixel:
            train = {f: v for (f, cc, split), v in iou.items() if cc == c and split == "train"}
            if train:
                best = min(train, key=lambda f: (-train[f], f))
                if (best, c, "val") in iou:
                    singles.append(iou[(best, c, "val")])
        seg, cls = (
            [
                v
                for (v,) in con.execute(
                    "SELECT val_score FROM embeddings WHERE probe_id = ? AND kind = ? AND val_score IS NOT NULL",
                    [probe_id, kind],
                ).fetchall()
            ]
            for kind in ("segmentation", "classification")
        )
        assert singles and seg and cls
        assert row["single_unit_iou"] == pytest.approx(np.mean(singles))
        assert row["embedding_iou"] == pytest.approx(np.mean(seg))
        assert row["classification_accuracy"] == pytest.approx(np.mean(cls))
    con.close()
    compared = api.query(
        "compare-probes",
        db,
        concept=api.sql("SELECT name FROM concepts WHERE level = 'pixel' LIMIT 1", db).column(0)[0].as_py(),
    )
    assert compared.num_rows == 2
    run_every_query(db)


class _FunctionalRead(torch.nn.Module):
    """A conv whose weights are read by the parent's forward without the conv itself being called."""

    def __init__(self, read_without_call: bool):
        super().__init__()
        self.read_without_call = read_without_call
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.side = torch.nn.Conv2d(4, 4, 1)
        self.tap = torch.nn.Identity()
        self.head = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = self.conv(x)
        x = torch.nn.functional.conv2d(x, self.side.weight, self.side.bias) if self.read_without_call else self.side(x)
        return self.head(self.tap(x).flatten(1))


def test_the_drop_check_sees_every_use_of_a_dropped_weight():
    """drop_unreached's check does not rely on a meta weight failing when it is read (a CPU conv2d
    given one may return garbage, and once returned the output before): any torch function or method
    given a watched tensor, directly or inside a list, is recorded; other tensors are not."""
    from n2vdb.models.layers import _Reads

    x, weight, other = torch.rand(1, 4, 6, 6), torch.empty(4, 4, 1, 1, device="meta"), torch.rand(4, 4, 1, 1)
    with _Reads([weight]) as watch:
        torch.nn.functional.conv2d(x, other)
        torch.cat([other, other])
    assert not watch.read
    for use in (
        lambda: torch.nn.functional.conv2d(x, weight),
        lambda: torch.cat([other.to("meta"), weight]),
        lambda: weight.flatten(),
    ):
        with _Reads([weight]) as watch:
            try:
                use()
            except RuntimeError:
                pass  # a use that fails is a use too
        assert watch.read


@pytest.mark.parametrize("read_without_call", [False, True])
def test_drop_unreached_frees_only_weights_the_tap_never_needs(read_without_call):
    """The head past the tapped module is freed (meta tensors) and the tap's output is unchanged; a
    model reading a module's weights without calling it keeps every weight, as the check finds."""
    from n2vdb.models.layers import LayerTap

    torch.manual_seed(0)
    net = _FunctionalRead(read_without_call).eval()
    tap = LayerTap(net, "tap", relu=False)
    x = torch.rand(2, 3, 8, 8)
    before = tap(x)
    freed = tap.drop_unreached(torch.rand(1, 3, 8, 8))
    head_bytes = sum(p.numel() * 4 for p in net.head.parameters())
    if read_without_call:
        assert freed == 0 and not any(p.is_meta for p in net.parameters())
    else:
        assert freed == head_bytes and all(p.is_meta for p in net.head.parameters())
        assert not any(p.is_meta for m in (net.conv, net.side) for p in m.parameters())
    assert torch.equal(tap(x), before)
