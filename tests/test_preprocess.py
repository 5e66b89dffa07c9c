"""--preprocess caffe is NetDissect-Lite's input normalisation, checked by hand on one image."""

import numpy as np
import pytest
import torch
from conftest import write_broden
from PIL import Image

from n2vdb import extract
from n2vdb.data import importer
from n2vdb.data.broden import BrodenDataset
from n2vdb.ingest import IngestOptions, make_spec
from n2vdb.store import write_connection


@pytest.fixture
def one_image(tmp_path):
    root = tmp_path / "one"
    pixels = np.random.default_rng(4).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    (root / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(root / "images" / "a.png")  # lossless, so the pixels are known
    write_broden(
        root,
        [{"image": "a.png", "split": "train", "ih": 5, "iw": 5, "sh": 5, "sw": 5, "scene": "1"}],
        [(1, "x-s", "scene(1)")],
    )
    return root, pixels


def netdissect_lite_input(rgb: np.ndarray) -> np.ndarray:
    """As NetDissect-Lite's normalize_image + feature_extraction: BGR, minus the BGR mean, back to RGB
    (its [:, ::-1]), divided by 255 x 0.224 in float32."""
    img = np.array(rgb, dtype=np.float32)[:, :, ::-1]
    img -= [109.5388, 118.6897, 124.6901]
    img = img.transpose((2, 0, 1))[::-1].copy()
    return (torch.from_numpy(img) / (255.0 * 0.224)).numpy()


def test_caffe_is_netdissect_lites_normalisation(one_image):
    root, pixels = one_image
    dataset = BrodenDataset.open(root)
    rows = extract.ImageFolderRows(dataset, dataset.rows, 5, extract.CAFFE_MEAN, extract.CAFFE_STD, "caffe")
    _, tensor, error = rows[0]
    assert error == ""
    expected = netdissect_lite_input(pixels)
    assert np.array_equal(tensor.numpy(), expected)
    # channel 0 is red: the red pixel minus 124.6901, not the blue mean
    assert tensor[0, 0, 0].item() == pytest.approx((pixels[0, 0, 0] - 124.6901) / 57.12, abs=1e-5)


def test_torchvision_is_the_weights_mean_and_std(one_image):
    root, pixels = one_image
    dataset = BrodenDataset.open(root)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    _, tensor, _ = extract.ImageFolderRows(dataset, dataset.rows, 5, mean, std)[0]
    expected = (pixels.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    assert np.allclose(tensor.numpy(), expected.transpose(2, 0, 1), atol=1e-6)


def test_preprocess_is_part_of_the_probe_key(tmp_path, one_image):
    root, _ = one_image
    with write_connection(tmp_path / "k.duckdb") as con:
        importer.add_dataset(con, root, "one")
        default = make_spec(con, "alexnet", "conv5", IngestOptions(dataset="one", weights="random")).spec
        tv = make_spec(
            con, "alexnet", "conv5", IngestOptions(dataset="one", weights="random", preprocess="torchvision")
        ).spec
        caffe = make_spec(
            con, "alexnet", "conv5", IngestOptions(dataset="one", weights="random", preprocess="caffe")
        ).spec
    assert default.key == tv.key and default.preprocess == "torchvision"
    assert caffe.key != tv.key and caffe.extraction_key != tv.extraction_key  # new activations, not a variant
    assert caffe.settings()["preprocess"] == "caffe" and caffe.mean == extract.CAFFE_MEAN


def test_unknown_preprocess_is_a_usage_error(tmp_path, one_image):
    from n2vdb.errors import UsageError

    root, _ = one_image
    with write_connection(tmp_path / "k.duckdb") as con:
        importer.add_dataset(con, root, "one")
        with pytest.raises(UsageError, match="preprocess 'bgr'"):
            make_spec(con, "alexnet", "conv5", IngestOptions(dataset="one", weights="random", preprocess="bgr"))
