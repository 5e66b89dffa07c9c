"""Whole ingests across model families (random weights) on the built-in concept set: each layer's
output shape, kind and stored shape, and the wall time of the ingest.

    python bench/backbones.py [--images 60] [--limit 24] [--epochs 1] [--only alexnet,vit_b_16 ...]

Each probe runs every stage (extraction, thresholds, IoU, embeddings; vector layers skip IoU and
segmentation) in one scratch database; `db check` must pass at the end. timm families are skipped
when timm is not installed.
"""

import argparse
import importlib.util
import time

from n2vdb import api
from n2vdb.models import registry
from n2vdb.probe import TrainSettings

from common import peak_rss_mib, save_result, scratch

FAMILIES = [  # (family, model, layer)
    ("AlexNet (CNN map)", "alexnet", "conv5"),
    ("AlexNet (fc vector)", "alexnet", "fc7"),
    ("ResNet", "resnet18", "layer4"),
    ("EfficientNet", "efficientnet_b0", "features.6"),
    ("ConvNeXt", "convnext_tiny", "stage3"),
    ("Swin (channels-last)", "swin_t", "stage3"),
    ("ViT (tokens)", "vit_b_16", "block9"),
    ("timm ViT (tokens)", "timm:vit_small_patch16_224", "blocks.9"),
    ("timm ConvNeXt", "timm:convnext_tiny", "stages.2"),
    ("timm Swin (NHWC)", "timm:swin_tiny_patch4_window7_224", "layers.2"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated models")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    has_timm = importlib.util.find_spec("timm") is not None
    _root, db, _tmp = scratch(args.images)
    print(f"{args.limit} of {args.images} built-in images, random weights, {args.epochs} epoch(s), workers 0")
    print("| family | model | layer | output | kind | stored | ingest s |")
    print("|---|---|---|---|---|---|---|")
    seconds_of = {}
    for family, model, layer in FAMILIES:
        if (only and model not in only) or (model.startswith("timm:") and not has_timm):
            continue
        spec = registry.resolve_layer(model, layer)
        row = next(r for r in registry.layer_table(model) if r["module"] == spec.module)
        start = time.perf_counter()
        api.ingest(
            model,
            layer,
            db,
            dataset="synthetic",
            weights="random",
            limit=args.limit,
            workers=0,
            train=TrainSettings(epochs=args.epochs),
        )
        seconds = time.perf_counter() - start
        seconds_of[f"{model} {layer}"] = seconds
        print(
            f"| {family} | {model} | {layer} | {row['output']} | {row['kind']} | {row['stored']} | {seconds:.1f} |",
            flush=True,
        )
    failed = [r["check_name"] for r in api.db_check(db).to_pylist() if r["violations"]]
    print(f"db check: {'clean' if not failed else 'FAILED ' + ', '.join(failed)}; peak RSS {peak_rss_mib():.0f} MiB")
    slowest = max(seconds_of, key=seconds_of.get)
    save_result(
        "backbones",
        f"{len(seconds_of)} families, {min(seconds_of.values()):.1f}-{max(seconds_of.values()):.1f} s "
        f"per ingest (slowest {slowest} {seconds_of[slowest]:.1f} s); db check "
        f"{'clean' if not failed else 'FAILED'}",
        {
            "images": args.images,
            "limit": args.limit,
            "epochs": args.epochs,
            "ingest_s": seconds_of,
            "db_check_failed": failed,
            "timm": has_timm,
            "peak_rss_mib": peak_rss_mib(),
        },
    )


if __name__ == "__main__":
    main()
