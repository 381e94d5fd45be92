"""Time and peak memory of all-pairs verification on N synthetic embeddings: `kd-plugin bench all_pairs`.

Prints one JSON object (last stdout line): n, pairs, seconds, peak resident memory, and the size the full N x N
float32 score matrix would have needed."""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from kd_plugin.evaluation import pair_score_blocks, roc_summary


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(prog="kd-plugin bench all_pairs", description=__doc__)
    parser.add_argument("--n", type=int, default=100_000, help="number of images (embeddings)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--images-per-identity", type=int, default=20)
    parser.add_argument("--block", type=int, default=4096)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    labels = np.arange(args.n) // args.images_per_identity
    centres = rng.normal(size=(labels[-1] + 1, args.dim)).astype(np.float32)
    emb = centres[labels] + rng.normal(scale=1.2, size=(args.n, args.dim)).astype(np.float32)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    result = roc_summary(lambda: pair_score_blocks(emb, labels, block=args.block, progress=True))
    seconds = time.perf_counter() - start
    print(json.dumps({"n": args.n, "pairs": result["num_pos"] + result["num_neg"], "seconds": round(seconds, 1),
                      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "rss_before_gib": round(rss_before, 2),
                      "full_matrix_gib": round(4 * args.n ** 2 / 2**30, 1), "tpr_at_fpr": result["tpr_at_fpr"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
