"""Plain PyTorch baselines the benchmarks compare the project against.

Each subcommand runs one loop the way a user would write it by hand (the PyTorch transfer
learning tutorial's style) and prints one JSON line. The parent benchmark runs it in its own
process to measure wall time and peak memory, exactly as it measures `train.py`.

    python benchmarks/plain_loops.py bare_forward --data-root $FINETUNE_DATA_ROOT [--dataset flowers102]
    python benchmarks/plain_loops.py tutorial_probe --epochs 25 --batch-size 4
    python benchmarks/plain_loops.py finetune_epochs --epochs 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from common import DATA_ROOT
from finetune import backbones

MODEL = {"name": "efficientnet_lite0", "source": "efficientnet_lite", "weights": "DEFAULT"}


def presets() -> tuple[v2.Compose, v2.Compose]:
    """Train (random resized crop + flip, as in the tutorial) and eval presets for the model's
    weights: EfficientNet-Lite takes 224 px, bicubic, mean = std = 0.5."""
    spec = backbones.input_spec(MODEL)
    bicubic = InterpolationMode(spec.interpolation)
    normalise = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ]
    train = v2.Compose(
        [
            v2.RandomResizedCrop(spec.crop_size, interpolation=bicubic),
            v2.RandomHorizontalFlip(),
            *normalise,
        ]
    )
    evaluation = v2.Compose(
        [
            v2.Resize(spec.resize_size, interpolation=bicubic),
            v2.CenterCrop(spec.crop_size),
            *normalise,
        ]
    )
    return train, evaluation


def image_folders(
    root: Path, train_tf, eval_tf, dataset: str = "hymenoptera"
) -> dict[str, datasets.VisionDataset]:
    """Train and val of `dataset` under the data root `root`: hymenoptera's class folders, or
    Flowers102's official train and val splits (torchvision's reader; the test split is not
    read, so its images may be absent)."""
    if dataset == "flowers102":
        return {
            split: datasets.Flowers102(str(root), split=split, transform=tf)
            for split, tf in (("train", train_tf), ("val", eval_tf))
        }
    folder = root / "hymenoptera_data"
    return {
        "train": datasets.ImageFolder(folder / "train", train_tf),
        "val": datasets.ImageFolder(folder / "val", eval_tf),
    }


def pretrained_with_new_head(num_classes: int) -> nn.Module:
    net = backbones.pretrained_network(MODEL)
    net.classifier = nn.Linear(net.classifier.in_features, num_classes)
    return net


def bare_forward(args) -> dict:
    """Load the model and run one no_grad forward pass over train + val of `--dataset` with the
    eval preset."""
    started = time.perf_counter()
    _, eval_tf = presets()
    net = backbones.pretrained_network(MODEL).eval()
    images = 0
    with torch.no_grad():
        for dataset in image_folders(args.data_root, eval_tf, eval_tf, args.dataset).values():
            loader = DataLoader(dataset, batch_size=64, num_workers=args.num_workers)
            for batch, _ in loader:
                net.forward_features(batch)
                images += len(batch)
    return {"images": images, "seconds_inside": round(time.perf_counter() - started, 2)}


def run_epoch(net, loader, criterion, optimizer=None) -> tuple[float, float]:
    training = optimizer is not None
    correct, seen, loss_sum = 0, 0, 0.0
    for images, labels in loader:
        with torch.set_grad_enabled(training):
            logits = net(images)
            loss = criterion(logits, labels)
        if training:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        loss_sum += float(loss) * len(labels)
    return correct / seen, loss_sum / seen


def tutorial_probe(args) -> dict:
    """The tutorial's "ConvNet as fixed feature extractor": frozen backbone recomputed every
    epoch, SGD(lr 0.001, momentum 0.9), StepLR(7, 0.1), best val epoch kept."""
    started = time.perf_counter()
    torch.manual_seed(0)
    train_tf, eval_tf = presets()
    data = image_folders(args.data_root, train_tf, eval_tf)
    loaders = {
        split: DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=split == "train",
            num_workers=args.num_workers,
        )
        for split, dataset in data.items()
    }
    net = pretrained_with_new_head(len(data["train"].classes))
    for name, parameter in net.named_parameters():
        parameter.requires_grad = name.startswith("classifier.")
    optimizer = torch.optim.SGD(net.classifier.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    best_acc, final_acc = 0.0, 0.0
    for _ in range(args.epochs):
        net.train()
        run_epoch(net, loaders["train"], criterion, optimizer)
        scheduler.step()
        net.eval()
        final_acc, _ = run_epoch(net, loaders["val"], criterion)
        if final_acc > best_acc:
            best_acc = final_acc  # the tutorial keeps this epoch's weights
    return {
        "val_acc": round(best_acc, 4),
        "final_val_acc": round(final_acc, 4),
        "epochs": args.epochs,
        "seconds_inside": round(time.perf_counter() - started, 2),
    }


def finetune_epochs(args) -> dict:
    """Full fine-tuning, every layer trains: seconds per training epoch (after a first epoch
    that warms up workers and allocator), same model, batch size and transforms as the
    project's default run."""
    torch.manual_seed(0)
    train_tf, eval_tf = presets()
    data = image_folders(args.data_root, train_tf, eval_tf)
    loader = DataLoader(
        data["train"],
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.num_workers,
        persistent_workers=args.num_workers > 0,
        drop_last=len(data["train"]) % args.batch_size == 1,
    )
    net = pretrained_with_new_head(len(data["train"].classes)).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.001, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    epoch_seconds = []
    for _ in range(args.epochs):
        started = time.perf_counter()
        run_epoch(net, loader, criterion, optimizer)
        epoch_seconds.append(time.perf_counter() - started)
    return {"epoch_seconds": [round(s, 2) for s in epoch_seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loop", choices=["bare_forward", "tutorial_probe", "finetune_epochs"])
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument(
        "--dataset",
        choices=["hymenoptera", "flowers102"],
        default="hymenoptera",
        help="bare_forward only; the training loops run hymenoptera",
    )
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    result = globals()[args.loop](args)
    print(json.dumps({"loop": args.loop, **result}))


if __name__ == "__main__":
    main()
