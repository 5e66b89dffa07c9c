"""Test helpers: probes built from activations the tests choose (through the library's own writers),
and the command line run in-process."""

import contextlib
import io
import os
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from n2vdb import activations as acts_store
from n2vdb import pipeline
from n2vdb import probe as probes
from n2vdb.data import importer
from n2vdb.data.broden import BrodenDataset
from n2vdb.embed.examples import SegExample
from n2vdb.stats import iou as iou_stage
from n2vdb.stats.thresholds import compute_thresholds
from n2vdb.store import write_connection
from n2vdb.store.sessions import Pinned


def planted_probe(
    db: Path, root: Path, acts: np.ndarray, quantile: float = 0.995, mode: str = "net2vec", name: str = "planted"
) -> tuple[int, BrodenDataset]:
    """Register ROOT, store ACTS [N, K, H, W] (row order = index.csv order) as a probe, run thresholds + IoU."""
    with write_connection(db) as con:
        dataset_id = importer.add_dataset(con, root, name)
        dataset = BrodenDataset.open(root)
        spec = probes.ProbeSpec(
            model="planted",
            layer="x",
            module="x",
            relu=False,
            weights="planted",
            dataset_id=dataset_id,
            input_size=0,
            mean=(0.0,),
            std=(1.0,),
            quantile=quantile,
            iou_mode=mode,
        )
        probe, _ = pipeline.find_or_create(con, spec)
        n, k, h, w = acts.shape
        con.execute(
            "UPDATE probes SET n_filters = ?, height = ?, width = ? WHERE probe_id = ?", [k, h, w, probe.probe_id]
        )
        probe.n_filters, probe.height, probe.width = k, h, w
        codes, scales = acts_store.quantise(torch.from_numpy(acts))
        ids = np.array([r.image_id for r in dataset.rows])
        acts_store.write(
            con, acts_store.to_arrow(probe.probe_id, ids, codes.numpy(), scales.numpy(), acts.mean(axis=(2, 3)))
        )
        compute_thresholds(Pinned(con), probe, quantile)
        iou_stage.run(Pinned(con), probe, dataset, mode)
        return probe.probe_id, dataset


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, stdin: str | None = None, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """The n2vdb command line inside this process: main() with ARGS, its output and exit code.
    About 2 s of CPU cheaper per call than a subprocess (no fresh torch import); keep subprocesses
    where the process is the point (signals, kill -9, locks held by another process, a closed stdout).

    As a subprocess would: an exception that escapes main() is printed as a traceback on stderr with
    exit 1 (so "no traceback" assertions can fail), and warnings are printed on stderr under Python's
    default filters (so "one line on stderr" assertions see them). The signal handlers and the
    interrupt state main() sets are put back afterwards, so one call cannot change the next."""
    from n2vdb import cli

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    state = {name: getattr(cli, name) for name in ("_SIGNALLED", "_PENDING", "_SAID_INTERRUPTED")}

    def show_warning(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with (
        mock.patch.object(sys, "argv", ["n2vdb", *map(str, args)]),
        mock.patch.object(sys, "stdin", io.StringIO(stdin or "")),
        mock.patch.dict(os.environ, env or {}),
        contextlib.chdir(cwd or os.getcwd()),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(),
    ):
        warnings.resetwarnings()  # Python's own defaults, as a fresh `python -m n2vdb` has them
        for action, category in (
            ("ignore", DeprecationWarning),
            ("ignore", PendingDeprecationWarning),
            ("ignore", ImportWarning),
            ("ignore", ResourceWarning),
        ):
            warnings.simplefilter(action, category)
        warnings.showwarning = show_warning
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception:
            traceback.print_exc()  # what the interpreter prints for an uncaught exception
            code = 1
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
            for name, value in state.items():
                setattr(cli, name, value)
    return CliResult(code, out.getvalue(), err.getvalue())


def classification_one_at_a_time(features, labels, is_val, *, epochs, lr, batch, seed, keep=None):
    """The reference's recipe, concept by concept with torch's own SGD, StepLR and BCE, on the draws the
    joint trainer makes from the same seed (val sample, initial weights, then each epoch's sample and
    order): [(weights [K], bias)] per concept, to compare with classification.train."""
    import torch.nn.functional as F

    from n2vdb.embed import classification

    k, c = features.shape[1], labels.shape[1]
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = features[~is_val], labels[~is_val]
    classification.balanced_sample(labels[is_val], g)
    init = (torch.rand(k, c, generator=g) * 2 - 1) / np.sqrt(k)
    if keep is not None:
        init = init * keep
    draws = [
        (classification.balanced_sample(train_y, g), torch.randperm(len(train_x), generator=g)) for _ in range(epochs)
    ]
    trained = []
    for j in range(c):
        w, b = init[:, j].clone().requires_grad_(), torch.zeros((), requires_grad=True)
        optimiser = torch.optim.SGD([w, b], lr=lr, momentum=0.9)
        schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=max(1, epochs // 2), gamma=0.1)
        for selection, order in draws:
            mine = [int(i) for i in order if selection[i, j]]
            for start in range(0, len(mine), batch):
                idx = mine[start : start + batch]
                optimiser.zero_grad()
                F.binary_cross_entropy_with_logits(train_x[idx] @ w + b, train_y[idx, j].float()).backward()
                if keep is not None:
                    w.grad *= keep[:, j]
                optimiser.step()
            schedule.step()
        trained.append((w.detach(), b.detach()))
    return trained


def random_examples(
    gen: torch.Generator,
    n: int,
    shape: tuple[int, int, int],
    mask_shape: tuple[int, int],
    concepts=lambda i: [1, 2, 4][: 1 + i % 3],
    split=lambda i: "train",
    on: float = 0.3,
    labelled=lambda i: 0.5,
) -> list[SegExample]:
    """N segmentation examples with random binary maps of SHAPE (a fraction ON of values on) and
    random masks of MASK_SHAPE for image i's CONCEPTS(i) (a fraction LABELLED(i) of pixels in each)."""
    examples = []
    for i in range(n):
        ids = np.array(concepts(i))
        binary = torch.rand(*shape, generator=gen) < on
        masks = torch.rand(len(ids), *mask_shape, generator=gen) < labelled(i)
        examples.append(SegExample(i, split(i), binary, ids, masks))
    return examples
