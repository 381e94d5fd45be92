"""Teacher throughput vs cache-building throughput, side by side: `kd-plugin bench cache --teacher SPEC --data DATA`.

(a) the teacher embedding the images and their flips from memory (decoded beforehand), (b) `build_cache` on the same
dataset (decoding included). Prints one JSON object as the last stdout line with both rates and their ratio."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    """`kd-plugin bench cache` entry point."""
    from kd_plugin.benchmarks.memory import require
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.normalization import given_normalization
    from kd_plugin.teachers import build_cache, load_embedder

    parser = argparse.ArgumentParser(prog="kd-plugin bench cache", description=__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--mean")
    parser.add_argument("--std")
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    teacher = load_embedder(args.teacher, given_normalization(args.mean, args.std, False), batch_size=args.batch_size,
                            onnx_on_cpu="onnxruntime")
    dataset = open_dataset(args.data)
    height, width = dataset.image_size
    require(len(dataset) * 3 * height * width, f"bench cache: the {len(dataset)} decoded images of {args.data} held "
            f"in memory", "cpu", "time it on a subset (kd-plugin pack a few identities of it) instead")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    start = time.perf_counter()
    for s in range(0, len(images), args.batch_size):
        chunk = images[s:s + args.batch_size]
        teacher.embed(chunk)
        teacher.embed(chunk.flip(3))
    online = 2 * len(images) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        build_cache(teacher, dataset, out, args.teacher, args.batch_size, progress=False)
        cached = 2 * len(images) / (time.perf_counter() - start)
    result = {"images": len(dataset), "teacher_embeddings_per_s": round(online, 1),
              "cache_build_embeddings_per_s": round(cached, 1), "ratio": round(cached / online, 3)}
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
