"""`kd-plugin demo`: distillation end to end on data and a teacher it makes itself, on CPU, in minutes.

1. Synthetic identities: each identity is a random smooth colour pattern; its images are shifted crops of it with
   brightness changes and noise (not faces: a stand-in that needs no download). Training identities are packed into
   an insightface train.rec; held-out identities form the verification set.
2. A teacher (`demo_teacher`, a small CNN) is trained on them with the margin softmax, then its embeddings are cached.
3. Students (`demo_student`, 16x fewer channels) are trained with the same budget and seed: no KD, ProxylessKD (centres
   estimated from the teacher), EKD, and both.
4. A table of all-pairs TPR@FPR on the held-out identities, for each student and the teacher, plus the cross-model
   figure (student queries against the teacher's gallery). The last stdout line is the JSON of the table."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image



def demo_methods() -> tuple[str, ...]:
    """No KD, then each method this plugin is named for and their combination."""
    from kd_plugin.methods import this_plugins_methods

    ours = this_plugins_methods()
    return ("none", *ours, "+".join(ours))


def make_identities(root: str, identities: int, per_identity: int, seed: int) -> None:
    """An ImageFolder tree of synthetic identities (JPEG, 112x112)."""
    rng = np.random.default_rng(seed)
    for ident in range(identities):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((136, 136), Image.BICUBIC)
        fine = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((136, 136), Image.BICUBIC)
        template = 0.6 * np.asarray(coarse, np.float32) + 0.4 * np.asarray(fine, np.float32)
        folder = os.path.join(root, f"id{ident:04d}")
        os.makedirs(folder, exist_ok=True)
        for k in range(per_identity):
            dy, dx = rng.integers(0, 25, 2)
            img = template[dy:dy + 112, dx:dx + 112] * rng.uniform(0.6, 1.4) + rng.uniform(-40, 40)
            img = img + rng.normal(0, 20, img.shape)
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            with open(os.path.join(folder, f"{k:03d}.jpg"), "wb") as f:
                f.write(buf.getvalue())


def _say(message: str) -> None:
    print(f"[demo] {message}", file=sys.stderr, flush=True)


def run(out: str, identities: int = 60, per_identity: int = 20, val_identities: int = 30, teacher_epochs: int = 12,
        student_epochs: int = 8, batch_size: int = 64, seed: int = 0) -> dict:
    """The whole demo; returns the results table as a dict."""
    from kd_plugin.run.config import resolve
    from kd_plugin.data import open_dataset
    from kd_plugin.data.pack import pack_dataset
    from kd_plugin.evaluation import evaluate_pairs
    from kd_plugin.methods import kd_block
    from kd_plugin.teachers import build_cache, load_embedder
    from kd_plugin.run.train import train

    start = time.perf_counter()
    train_dir, val_dir, rec_dir = (os.path.join(out, "data", d) for d in ("train_images", "val", "train"))
    _say(f"making {identities} training identities x {per_identity} images and {val_identities} held-out identities")
    make_identities(train_dir, identities, per_identity, seed)
    make_identities(val_dir, val_identities, per_identity // 2, seed + 1)
    pack_dataset(open_dataset(train_dir), rec_dir, progress=False)
    base = {"rec": rec_dir, "num_classes": identities, "embedding_size": 128, "batch_size": batch_size,
            "lr": 0.1, "warmup_epoch": 1, "num_workers": 0, "frequent": 25, "seed": seed,
            "margin_list": (1.0, 0.4, 0.0), "checkpoint_every": 10 ** 9}
    _say(f"training the teacher (demo_teacher, {teacher_epochs} epochs)")
    train(resolve(dict(base, network="demo_teacher", num_epoch=teacher_epochs, output=os.path.join(out, "teacher"))))
    teacher_spec = f"demo_teacher:{os.path.join(out, 'teacher', 'model.pt')}"
    teacher = load_embedder(teacher_spec)
    _say("caching the teacher's embeddings of every training image and its flip")
    cache_dir = os.path.join(out, "teacher_cache")
    build_cache(teacher, open_dataset(rec_dir), cache_dir, teacher_spec, progress=False)
    results = {"teacher": evaluate_pairs(val_dir, teacher, progress=False)}
    sampler = {"identities_per_batch": 8, "images_per_identity": 4, "balanced": True}  # every student: the same batches
    for method in demo_methods():
        _say(f"training the student with {method} ({student_epochs} epochs)")
        kd = kd_block(method, teacher=teacher_spec, cache=cache_dir, sampler=sampler)
        output = os.path.join(out, method.replace("+", "_"))
        train(resolve(dict(base, network="demo_student", num_epoch=student_epochs, output=output, kd=kd)))
        student = load_embedder(f"demo_student:{os.path.join(output, 'model.pt')}")
        figures = evaluate_pairs(val_dir, student, progress=False)
        figures["cross"] = evaluate_pairs(val_dir, student, gallery_model=teacher, progress=False)["tpr_at_fpr"]
        results[method] = figures
    table = {name: {"tpr@1e-2": r["tpr_at_fpr"]["1e-02"], "tpr@1e-3": r["tpr_at_fpr"]["1e-03"],
                    "auc": r["auc"], "cross_tpr@1e-3": r.get("cross", {}).get("1e-03")} for name, r in results.items()}
    table["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out, "demo_results.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1)
    return table


def format_table(table: dict) -> str:
    """The results as a markdown table."""
    rows = ["| model | TPR@1e-2 | TPR@1e-3 | AUC | cross TPR@1e-3 (student vs teacher gallery) |", "|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in table.items():
        if name != "seconds":
            rows.append(f"| {name} | {fmt(r['tpr@1e-2'])} | {fmt(r['tpr@1e-3'])} | {fmt(r['auc'])} | "
                        f"{fmt(r['cross_tpr@1e-3'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """`kd-plugin demo` entry point."""
    parser = argparse.ArgumentParser(prog="kd-plugin demo", description=__doc__)
    parser.add_argument("--out", default="work_dirs/demo", help="where data, models and results go")
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for smoke tests")
    args = parser.parse_args(argv)
    sizes = dict(identities=12, per_identity=8, val_identities=8, teacher_epochs=1, student_epochs=1,
                 batch_size=48) if args.quick else {}
    table = run(args.out, **sizes)
    print(format_table(table))
    print(f"(all-pairs verification on held-out synthetic identities; {table['seconds']} s)")
    print(json.dumps(table))
    return 0
