"""CPU latency of the int8 ONNX export against the float one (`export.py format=onnx
quantize=int8`), on onnxruntime's CPU provider.

    python benchmarks/int8_latency.py outputs/runs/<run> [--batch 1] [--threads 0] [--repeats 50]

Exports the run's best checkpoint twice into a temporary folder (float, then int8 calibrated on
its training images, as export.py does), then times each file on the same real val image batch:
a few warm-up runs, then the median of `--repeats` runs, in ms per image. Prints one JSON line:
the two latencies, the speed-up, the file sizes and the int8 model's top-1 agreement with the
float model on the run's val images (model.json's `quantization`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit
from finetune.calibration import temperature_for
from finetune.data import load_rgb
from finetune.export import INPUT_NAME, export_int8, export_model
from finetune.predict import find_checkpoint, load_model
from finetune.quantize import split_files
from finetune.transforms import eval_transform

WARMUP = 5


def milliseconds_per_image(model: Path, batch: np.ndarray, repeats: int, threads: int) -> float:
    """The median over `repeats` runs of `batch` through `model`, in ms per image."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (the physical cores)
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(WARMUP):
        session.run(None, {INPUT_NAME: batch})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {INPUT_NAME: batch})
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / len(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run dir (or a checkpoint inside one)")
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--calibration-images", type=int, default=200)
    args = parser.parse_args(argv)

    checkpoint = find_checkpoint(args.run)
    model, spec, class_names = load_model(checkpoint)
    temperature = temperature_for(checkpoint)
    transform = eval_transform(spec)
    val = split_files(checkpoint, "val")[: args.batch]
    batch = np.stack([transform(load_rgb(str(f))).numpy() for f in val]).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        float_path, int8_path = Path(folder) / "float.onnx", Path(folder) / "int8.onnx"
        export_model(model, spec, class_names, "onnx", float_path, temperature=temperature)
        export_int8(
            model,
            spec,
            class_names,
            int8_path,
            checkpoint,
            temperature=temperature,
            images=args.calibration_images,
        )
        quantization = json.loads(int8_path.with_suffix(".json").read_text())["quantization"]
        float_ms = milliseconds_per_image(float_path, batch, args.repeats, args.threads)
        int8_ms = milliseconds_per_image(int8_path, batch, args.repeats, args.threads)
    emit(
        {
            "benchmark": "int8_latency",
            "model": model.hparams["model"]["name"],
            "batch": len(batch),
            "threads": args.threads,
            "float_ms_per_image": round(float_ms, 3),
            "int8_ms_per_image": round(int8_ms, 3),
            "speedup": round(float_ms / int8_ms, 2),
            "float_file_bytes": quantization["float_file_bytes"],
            "int8_file_bytes": quantization["file_bytes"],
            "size_ratio": quantization["size_ratio"],
            "top1_agreement": quantization["top1_agreement"],
            "agreement_images": quantization["agreement_images"],
            "onnxruntime": onnxruntime.__version__,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
