"""Stage 1 of ingest: stream images through the model, store quantised activations."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from n2vdb import activations as acts_store
from n2vdb import heap
from n2vdb.data.broden import BrodenDataset, ImageRow
from n2vdb.errors import DatasetError
from n2vdb.models.device import pick_device
from n2vdb.models.layers import LayerTap, Layout
from n2vdb.probe import Probe, ProbeSpec
from n2vdb.progress import progress_bar
from n2vdb.store.behind import write_behind
from n2vdb.store.sessions import Store

PREPROCESS = ("torchvision", "caffe")
# NetDissect-Lite (and the Net2Vec reference): Caffe's BGR mean (109.5388, 118.6897, 124.6901)
# subtracted from the BGR image, whose channels are then flipped back to RGB, divided by 255 x 0.224:
# in RGB order, (pixel - (124.6901, 118.6897, 109.5388)) / 57.12 on the 0..255 scale.
CAFFE_MEAN = (124.6901, 118.6897, 109.5388)
CAFFE_STD = (255 * 0.224,) * 3


class ImageFolderRows(Dataset):
    """Whole images resized to size x size (no crop, so masks stay aligned) with the weights' own
    interpolation, normalised.

    torchvision: (pixel / 255 - mean) / std; caffe: (pixel - mean) / std with pixel in 0..255, as
    NetDissect-Lite computes it (the difference in float64 stored as float32, then the division)."""

    def __init__(
        self,
        dataset: BrodenDataset,
        rows: list[ImageRow],
        size: int,
        mean,
        std,
        preprocess: str = "torchvision",
        interpolation: str = "bilinear",
    ):
        self.dataset, self.rows, self.size, self.preprocess = dataset, rows, size, preprocess
        self.resample = getattr(Image.Resampling, interpolation.upper())  # the weights' own (registry.preprocessing)
        self.mean = torch.tensor(mean, dtype=torch.float64 if preprocess == "caffe" else torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        path = self.dataset.image_path(row)
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((self.size, self.size), self.resample)
        except FileNotFoundError:
            return row.image_id, torch.zeros(3, self.size, self.size), f"image {path} is missing"
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            return row.image_id, torch.zeros(3, self.size, self.size), f"image {path} cannot be decoded ({exc})"
        if self.preprocess == "caffe":
            pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float64)).permute(2, 0, 1)
            return row.image_id, (pixels - self.mean).float() / self.std, ""
        tensor = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255).permute(2, 0, 1)
        return row.image_id, (tensor - self.mean) / self.std, ""


def layer_shape(tap: LayerTap, size: int, device: torch.device) -> tuple[int, int, int]:
    """(K, H, W) of the tapped layer; the weights past it are freed on the way (LayerTap.drop_unreached)."""
    sample = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    tap.drop_unreached(sample)
    out = tap(sample)
    return tuple(int(d) for d in out.shape[1:])


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def remaining_rows(
    con: duckdb.DuckDBPyConnection, probe: Probe, spec: ProbeSpec, dataset: BrodenDataset
) -> list[ImageRow]:
    rows = dataset.rows[: spec.limit] if spec.limit else dataset.rows
    done = acts_store.stored_image_ids(con, probe.probe_id)
    return [r for r in rows if r.image_id not in done]


def stream(
    spec: ProbeSpec,
    dataset: BrodenDataset,
    rows: list[ImageRow],
    net: torch.nn.Module,
    device: str,
    batch_size: int,
    workers: int | None,
    progress: tuple[int, int],
):
    """Forward ROWS through the model in batches; yields (image ids, codes, scales, pooled) as numpy arrays,
    and first (before any batch) the layer shape (K, H, W). progress = (images done, images in all)."""
    dev = pick_device(device)
    net = net.to(dev)
    tap = LayerTap(
        net, spec.module, spec.relu, Layout.decode(spec.layout)
    )  # maps [B, K, H, W] whatever the layer gives
    yield layer_shape(tap, spec.input_size, dev)
    heap.keep_batch_buffers()  # every batch's layer outputs are reused, not mapped afresh (n2vdb.heap)
    loader = DataLoader(
        ImageFolderRows(dataset, rows, spec.input_size, spec.mean, spec.std, spec.preprocess, spec.interpolation),
        batch_size=batch_size,
        num_workers=default_workers() if workers is None else workers,
        pin_memory=dev.type == "cuda",
    )
    try:
        with progress_bar() as bar:
            task = bar.add_task(f"extracting {spec.model} {spec.layer}", total=progress[1], completed=progress[0])
            for image_ids, images, errors in loader:
                bad = [e for e in errors if e]
                if bad:
                    raise DatasetError(
                        f"{bad[0]}; replace that file with a readable copy of the same image "
                        "and re-run to resume (editing index.csv would shift image ids: register "
                        "an edited directory under a new name instead)"
                    )
                out = tap(images.to(dev, non_blocking=True)).float()
                codes, scales = acts_store.quantise(out)
                yield (image_ids.numpy(), codes.cpu().numpy(), scales.cpu().numpy(), out.mean(dim=(2, 3)).cpu().numpy())
                bar.advance(task, len(image_ids))
    finally:
        tap.handle.remove()


def extract(
    store: Store,
    probe: Probe,
    spec: ProbeSpec,
    dataset: BrodenDataset,
    net: torch.nn.Module,
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
) -> None:
    """Write the activations of every image not yet stored; each batch commits on its own, in write
    sessions short enough to let readers in."""
    with store.reading() as con:
        todo = remaining_rows(con, probe, spec, dataset)
    total = len(dataset.rows[: spec.limit] if spec.limit else dataset.rows)
    batches = stream(spec, dataset, todo, net, device, batch_size, workers, (total - len(todo), total))
    k, h, w = next(batches)
    probe.n_filters, probe.height, probe.width = k, h, w
    with store.sessions() as writer:
        writer.connection().execute(
            "UPDATE probes SET n_filters = ?, height = ?, width = ? WHERE probe_id = ?", [k, h, w, probe.probe_id]
        )

        def write(batch) -> None:  # one commit per batch, in the writer thread
            acts_store.write(writer.connection(), acts_store.to_arrow(probe.probe_id, *batch))

        write_behind(write, batches)
