"""Per-rank memory and time at MS1MV3 / Glint360K / WebFace42M scale, measured on synthetic data written for the
purpose: `kd-plugin bench scale --json`.

Side by side in one run: (1) opening a `.rec` of 5,000,000 records (insightface layout: header, images, identity
ranges); (1b) past 2^24: a .rec of 20,000,000 records (its float32 identity ranges rounded as insightface's are;
tiny records, 0.9 GB, not sparse) opened by 1 process and by the 4 ranks of one job (rank 0 reads, the others
receive), and an im2rec file without ranges opened by 4 ranks, counting the processes that write its label index;
(2) for W = 1, 2 and 4 gloo ranks, the peak resident memory each rank adds while (a) loading its class range
of an inherited classifier of C = 1,000,000 x 512 from one classifier file, (b) creating AdaDistill's centres and
running one update (the margin loss after it costs B x C/W logits, as any partial-FC head does, and is left out),
(c) estimating class centres from embeddings spread over the ranks; each over C·d·bytes/W for the dtype it holds.
Then what these mean per GPU for MS1MV3, Glint360K and WebFace42M on 8 GPUs. The last stdout line is the JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from kd_plugin.benchmarks.memory import peak_rss_bytes, require, reset_peak_rss, rss_bytes
from kd_plugin.data.recordio import MAGIC
from kd_plugin.distributed import get_rank, get_world_size, settle_gloo_workers
from kd_plugin.errors import KDPluginError

_LABELS2 = [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8"),
            ("first", "<f4"), ("second", "<f4")]  # a record holding two float32 labels and no image
_IMAGE = [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8"),
          ("pixels", "<u4")]  # a record with a 4-byte stand-in for the image


def write_synthetic_rec(folder: str, num_images: int, num_classes: int, first_key: int = 0,
                        ranges: bool = True) -> None:
    """An insightface train.rec/idx/property of `num_images` tiny records (a 4-byte stand-in for each image, 44 bytes
    a record) over `num_classes` identities, written with numpy in seconds: the header record (key `first_key`),
    images in class order, identity-range records, their keys stored as float32 as insightface stores them (rounded
    past 2^24). `ranges=False`: im2rec's layout instead, images only, keys from `first_key`."""
    os.makedirs(folder, exist_ok=True)
    per_class = np.full(num_classes, num_images // num_classes, dtype=np.int64)
    per_class[: num_images % num_classes] += 1
    first_image = first_key + 1 if ranges else first_key
    ends = first_image + np.cumsum(per_class)
    end_images, end_ranges = first_image + num_images, first_image + num_images + num_classes
    labels2, image = np.dtype(_LABELS2), np.dtype(_IMAGE)
    header = np.zeros(1 if ranges else 0, labels2)
    images = np.zeros(num_images, image)
    range_records = np.zeros(num_classes if ranges else 0, labels2)
    for part in (header, images, range_records):
        part["magic"] = MAGIC
        part["lrec"] = part.dtype.itemsize - 8
    header["flag"], header["first"], header["second"] = 2, end_images, end_ranges
    images["label"], images["id"] = np.repeat(np.arange(num_classes), per_class), np.arange(first_image, end_images)
    if ranges:
        range_records["flag"], range_records["first"], range_records["second"] = 2, ends - per_class, ends
        range_records["id"] = np.arange(end_images, end_images + len(range_records))
    with open(os.path.join(folder, "train.rec"), "wb") as f:
        for part in (header, images, range_records):
            part.tofile(f)
    start = labels2.itemsize * len(header)
    offsets = np.concatenate([np.zeros(len(header), np.int64), start + image.itemsize * np.arange(num_images),
                              start + image.itemsize * num_images + labels2.itemsize * np.arange(len(range_records))])
    with open(os.path.join(folder, "train.idx"), "w", encoding="ascii") as f:
        for a in range(0, len(offsets), 1 << 20):  # in chunks: 20M lines at once would take GBs of strings
            chunk = offsets[a:a + (1 << 20)].tolist()
            f.write("".join(f"{first_key + a + k}\t{o}\n" for k, o in enumerate(chunk)))
    with open(os.path.join(folder, "property"), "w", encoding="ascii") as f:
        f.write(f"{num_classes},112,112")


# --- per-rank memory, W gloo ranks -------------------------------------------------------------------------------
DIM = 512
DATASETS = {"MS1MV3": (93_431, 5_179_510), "Glint360K": (360_232, 17_091_657), "WebFace42M": (2_059_906, 42_474_557)}


def _write_classifier(path: str, classes: int, dim: int) -> None:
    """A random (classes, dim) float32 classifier file, written by a child process (its memory is not ours)."""
    code = ("import torch, sys\nfrom kd_plugin.teachers.classifier import save_classifier\n"
            f"torch.manual_seed(0)\nsave_classifier(torch.randn({classes}, {dim}), {path!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _task_classifier(classes: int, path: str) -> tuple[int, int]:
    from kd_plugin.methods.heads import CombinedMarginLoss, PartialFCHead

    head = PartialFCHead(CombinedMarginLoss(), DIM, classes, centres=path, centre_dtype=torch.float16)
    return head.weight.numel(), head.weight.element_size()


def _task_adadistill(classes: int, path: str) -> tuple[int, int]:
    """AdaDistill's centres created, then one update from a gathered global batch of 128 per rank (the margin loss
    that follows costs B x C/W logits, as with any partial-FC head, and is not counted here)."""
    from kd_plugin.methods.heads import AdaDistillHead, CombinedMarginLoss
    from kd_plugin.distributed import gather_no_grad

    head = AdaDistillHead(CombinedMarginLoss(), DIM, classes, seed=0)
    generator = torch.Generator().manual_seed(get_rank())
    student, teacher = torch.randn(128, DIM, generator=generator), torch.randn(128, DIM, generator=generator)
    labels = torch.randint(0, classes, (128,), generator=generator)
    student, labels = head.gather(student, labels)
    head.update_centres(student, gather_no_grad(teacher), labels)
    return head.weight.numel(), head.weight.element_size()


def _task_centres(classes: int, path: str, rows_per_class: int = 2, chunk: int = 1024) -> tuple[int, int]:
    from kd_plugin.centres.estimate import ClassSums

    rank, world = get_rank(), get_world_size()
    total = classes * rows_per_class
    mine = torch.arange(rank, total, world)  # this rank's share of the images, as estimate_class_slice splits them
    sums = ClassSums(classes, DIM)
    generator = torch.Generator().manual_seed(rank)
    for a in range(0, math.ceil(math.ceil(total / world) / chunk) * chunk, chunk):  # the same rounds on every rank
        part = mine[a:a + chunk]
        sums.add(part % classes, torch.nn.functional.normalize(torch.randn(len(part), DIM, generator=generator), dim=1))
    centres = sums.centres("synthetic embeddings")
    return centres.rows.numel(), centres.rows.element_size()


TASKS = {"classifier": _task_classifier, "adadistill": _task_adadistill, "centres": _task_centres}


def _in_group(rank: int, world: int, port: int, out_dir: str, job, args: tuple) -> None:
    """One gloo rank of a benchmark: `job(*args)` returns this rank's figures, saved as `out_dir/rank{rank}.json`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        figures = job(*args)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
            json.dump(figures, f)
        dist.barrier()
    finally:
        settle_gloo_workers()  # see kd_plugin.distributed: no gloo thread may outlive the interpreter with a work
        dist.destroy_process_group()


def run_in_group(job, world: int, *args) -> list[dict]:
    """`job(*args)` on `world` fresh gloo processes started together; each rank's figures, in rank order."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_in_group, args=(world, port, out_dir, job, args), nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json"), encoding="utf-8") as f:
                ranks.append(json.load(f))
    return ranks


def _memory_job(task: str, classes: int, path: str) -> dict:
    """One rank's peak added memory and time while running `task` (imports outside the measured span)."""
    import torch.distributed as dist

    import kd_plugin.methods.heads  # noqa: F401
    import kd_plugin.centres.estimate  # noqa: F401
    dist.barrier()
    base = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    elements, size = TASKS[task](classes, path)
    seconds = time.perf_counter() - start
    added = max(peak_rss_bytes() - base, 0)
    return {"added_bytes": added, "held_elements": elements, "dtype_bytes": size, "seconds": seconds}


def per_rank_memory(task: str, classes: int, world: int, path: str) -> dict:
    """Run `task` on `world` gloo ranks: the largest peak any rank added, over C·d·bytes/W for the dtype it holds."""
    ranks = run_in_group(_memory_job, world, task, classes, path)
    dtype_bytes = ranks[0]["dtype_bytes"]
    ideal = classes * DIM * dtype_bytes / world
    return {"ratio": round(max(r["added_bytes"] for r in ranks) / ideal, 4), "ideal_bytes": int(ideal),
            "added_bytes": [r["added_bytes"] for r in ranks], "dtype_bytes": dtype_bytes,
            "seconds": round(max(r["seconds"] for r in ranks), 3)}


def rec_open(records: int, classes: int, folder: str) -> dict:
    """Write a synthetic .rec, then time `open_dataset` on it in a fresh process."""
    start = time.perf_counter()
    write_synthetic_rec(folder, records, classes)
    written = time.perf_counter() - start
    code = ("import time\nfrom kd_plugin.data import open_dataset\nt = time.perf_counter()\n"
            f"ds = open_dataset({folder!r})\nprint(time.perf_counter() - t, len(ds), ds.num_classes)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    seconds, opened, found = float(out[-3]), int(out[-2]), int(out[-1])
    if (opened, found) != (records, classes):
        raise KDPluginError(f"bench scale: the synthetic .rec opened as {opened} records of {found} classes, written "
                            f"as {records} of {classes}")
    return {"rec_open_seconds": round(seconds, 3), "records_per_second": int(records / seconds),
            "records": records, "classes": classes, "write_seconds": round(written, 2)}


def _open_job(folder: str, index_dir: str) -> dict:
    """One rank of a job opening the training set as kd-plugin train does (rank 0 reads, the others receive)."""
    import torch.distributed as dist

    from kd_plugin.data import datasets

    dist.barrier()
    start = time.perf_counter()
    dataset = datasets.open_training_data(folder, index_dir=index_dir)
    return {"seconds": time.perf_counter() - start, "images": len(dataset), "classes": int(dataset.num_classes),
            "index_writes": datasets.LABEL_INDEX_WRITES}


def rec_open_at_scale(records: int, classes: int, index_records: int, work: str) -> dict:
    """Past 2^24: a synthetic insightface .rec of `records` records (float32-rounded identity ranges) opened by 1 and
    by 4 processes of one job; and an im2rec file of `index_records` records (no ranges: every header is read)
    opened by 4 processes, counting the processes that wrote its label index."""
    folder, plain, index_dir = (os.path.join(work, name) for name in ("big", "plain", "out"))
    write_synthetic_rec(folder, records, classes)
    seconds = {}
    for processes in (1, 4):
        ranks = run_in_group(_open_job, processes, folder, index_dir)
        if any((r["images"], r["classes"]) != (records, classes) for r in ranks):
            raise KDPluginError(f"bench scale: the {records}-record .rec opened as {ranks}")
        seconds[str(processes)] = [round(r["seconds"], 2) for r in ranks]
    shutil.rmtree(folder)
    write_synthetic_rec(plain, index_records, max(1, index_records // 20), ranges=False)
    ranks = run_in_group(_open_job, 4, plain, index_dir)
    shutil.rmtree(plain)
    return {"rec_open_seconds_20m": seconds, "records_20m": records, "classes_20m": classes,
            "label_index_writers": sum(r["index_writes"] for r in ranks),
            "label_index_records": index_records, "label_index_open_seconds": [round(r["seconds"], 2) for r in ranks]}


def _per_gpu(result: dict, gpus: int = 8) -> dict:
    """What the measured ratios mean per GPU for the public datasets on `gpus` GPUs (d = 512)."""
    out = {}
    for name, (classes, images) in DATASETS.items():
        row = {"classes": classes, "images": images,
               "rec_open_seconds": round(images / result["records_per_second"], 1)}
        for key, dtype_bytes in (("classifier", 2), ("adadistill", 4), ("centres", 4)):
            held = classes * DIM * dtype_bytes / gpus
            ratio = max(result[f"{key}_rank_memory_ratio"].values())
            row[f"{key}_mib_per_gpu"] = round(held / 2**20, 1)
            row[f"{key}_host_peak_mib_per_rank"] = round(held * ratio / 2**20, 1)
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    """`kd-plugin bench scale` entry point."""
    parser = argparse.ArgumentParser(prog="kd-plugin bench scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=5_000_000, help="records of the synthetic .rec")
    parser.add_argument("--rec-classes", type=int, default=100_000, help="identities of the synthetic .rec")
    parser.add_argument("--big-records", type=int, default=20_000_000,
                        help="records of the synthetic .rec past 2^24, opened by 1 and 4 processes")
    parser.add_argument("--big-classes", type=int, default=1_000_000, help="its identities (WebFace42M: ~20 images each)")
    parser.add_argument("--index-records", type=int, default=500_000,
                        help="records of the synthetic im2rec file (no identity ranges) whose label index 4 processes "
                             "build")
    parser.add_argument("--classes", type=int, default=1_000_000, help="C for the per-rank memory figures (d = 512)")
    parser.add_argument("--worlds", default="1,2,4", help="numbers of gloo ranks")
    parser.add_argument("--work-dir", help="where the synthetic files go (default: a temporary folder, removed)")
    parser.add_argument("--json", action="store_true", help="print the results JSON as the last line of stdout")
    args = parser.parse_args(argv)
    import tempfile

    worlds = [int(w) for w in args.worlds.split(",") if w]
    # the classifier file, the largest rank's memory, and twice that for the spawned ranks' own overhead
    require(args.classes * DIM * 4 * 2, f"bench scale: a {args.classes} x {DIM} classifier and its per-rank copies",
            "cpu", "lower --classes")
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        print(f"bench scale: writing and opening a .rec of {args.records} records ...", file=sys.stderr, flush=True)
        result = rec_open(args.records, args.rec_classes, os.path.join(work, "rec"))
        shutil.rmtree(os.path.join(work, "rec"))
        print(f"  opened in {result['rec_open_seconds']} s ({result['records_per_second']} records/s)",
              file=sys.stderr, flush=True)
        print(f"bench scale: a .rec of {args.big_records} records opened by 1 and 4 processes; an im2rec file of "
              f"{args.index_records} records by 4 ...", file=sys.stderr, flush=True)
        result.update(rec_open_at_scale(args.big_records, args.big_classes, args.index_records, work))
        print(f"  {result['records_20m']} records: {result['rec_open_seconds_20m']} s per process; label index "
              f"written by {result['label_index_writers']} process(es) of 4", file=sys.stderr, flush=True)
        path = os.path.join(work, "classifier.pt")
        print(f"bench scale: writing a {args.classes} x {DIM} float32 classifier ...", file=sys.stderr, flush=True)
        _write_classifier(path, args.classes, DIM)
        result.update(classes=args.classes, embedding_size=DIM, worlds=worlds)
        for task, label in (("classifier", "loading the inherited classifier (float16 centres)"),
                            ("adadistill", "AdaDistill's centres and one update (float32, the loss not counted)"),
                            ("centres", "estimating class centres from 2 embeddings per class, 1024 rows per rank "
                                        "per round (float32)")):
            runs = {}
            for world in worlds:
                print(f"bench scale: {label}, {world} gloo rank(s) ...", file=sys.stderr, flush=True)
                runs[str(world)] = per_rank_memory(task, args.classes, world, path)
                print(f"  ratio {runs[str(world)]['ratio']:.3f} (largest added peak over C·d·bytes/W), "
                      f"{runs[str(world)]['seconds']:.1f} s", file=sys.stderr, flush=True)
            result[f"{task}_rank_memory_ratio"] = {w: r["ratio"] for w, r in runs.items()}
            result[f"{task}_runs"] = runs
    result["per_gpu_on_8_gpus"] = _per_gpu(result)
    for name, row in result["per_gpu_on_8_gpus"].items():
        print(f"{name} ({row['classes']} identities, {row['images']} images) on 8 GPUs: opening train.rec about "
              f"{row['rec_open_seconds']} s; inherited fp16 classifier {row['classifier_mib_per_gpu']} MiB per GPU "
              f"(host peak while loading {row['classifier_host_peak_mib_per_rank']} MiB per rank); AdaDistill "
              f"{row['adadistill_mib_per_gpu']} MiB (peak {row['adadistill_host_peak_mib_per_rank']}); centre "
              f"estimation {row['centres_mib_per_gpu']} MiB per rank (peak {row['centres_host_peak_mib_per_rank']})",
              file=sys.stderr if args.json else sys.stdout)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
