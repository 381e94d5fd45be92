"""Scale: opening a .rec from its identity ranges, per-rank class ranges of the classifier, AdaDistill and centre
estimation holding only their slice (equal to one process), estimated centres reused on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import shared
from distributed_helpers import run_ranks
from kd_plugin.benchmarks.scale import write_synthetic_rec
from kd_plugin.data import open_dataset
from kd_plugin.data.recordio import RecordIOReader
from kd_plugin.methods.heads import AdaDistillHead, CombinedMarginLoss, _sharding_free_normal
from test_train import _registered_for_this_module  # noqa: F401 (autouse: the test_tiny network, this module only)


def test_real_celeba_labels_from_identity_ranges_equal_every_records_header():
    rec = str(shared("celeba", "train.rec"))
    fast, scanned = open_dataset(rec), open_dataset(rec, skip_bad_records=True)  # skip mode reads every header
    assert np.array_equal(fast.labels, scanned.labels) and fast.keys == scanned.keys


def test_a_rec_with_identity_ranges_opens_without_reading_every_header(tmp_path, monkeypatch):
    write_synthetic_rec(str(tmp_path), 20_000, 300)
    reads = []
    real = RecordIOReader.read_header
    monkeypatch.setattr(RecordIOReader, "read_header", lambda self, key: reads.append(key) or real(self, key))
    ds = open_dataset(str(tmp_path))
    assert (len(ds), ds.num_classes) == (20_000, 300) and len(reads) <= 65  # the header record + 64 spot checks
    assert ds.labels[0] == 0 and ds.labels[-1] == 299 and np.bincount(ds.labels).min() == 20_000 // 300
    monkeypatch.undo()
    assert np.array_equal(ds.labels, open_dataset(str(tmp_path), skip_bad_records=True).labels)


def test_identity_ranges_that_disagree_with_the_records_fall_back_to_reading_them(tmp_path):
    write_synthetic_rec(str(tmp_path), 1_000, 10)
    raw = bytearray((tmp_path / "train.rec").read_bytes())
    first_image = 40  # the header record is 40 bytes; the image record's label is a float32 at byte 12
    raw[first_image + 12:first_image + 16] = np.float32(7).tobytes()
    (tmp_path / "train.rec").write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="its label 7 disagrees with the identity ranges"):
        ds = open_dataset(str(tmp_path))
    assert ds.labels[0] == 7 and ds.labels[1] == 0


def _block_normal_reference(rows, dim, start, count, seed, block):
    """The definition: whole blocks drawn at once, then sliced (what a rank must reproduce without the memory)."""
    parts = []
    for b in range(start // block, (start + count + block - 1) // block):
        size = min(block, rows - b * block)
        chunk = torch.normal(0.0, 0.01, (size, dim), generator=torch.Generator().manual_seed(seed * 1_000_003 + b))
        parts.append(chunk[max(start, b * block) - b * block:min(start + count, b * block + size) - b * block])
    return torch.cat(parts)


@pytest.mark.parametrize("rows, dim, start, count, block", [
    (300, 8, 101, 99, 1 << 16), (70_000, 3, 65_000, 4_999, 1 << 16), (9_001, 5, 4_095, 4_097, 1_000),
    (65_537, 1, 65_530, 7, 1 << 16), (20_000, 16, 0, 20_000, 6_000)])
def test_initial_centres_drawn_piecewise_equal_whole_draws(rows, dim, start, count, block):
    out = _sharding_free_normal(rows, dim, start, count, seed=3, block=block)
    assert torch.equal(out, _block_normal_reference(rows, dim, start, count, 3, block))


@pytest.mark.parametrize("classes, dim, world", [(1_000, 8, 3), (70_001, 3, 4), (10, 512, 3)])
def test_adadistill_ranks_draw_only_their_rows_of_the_same_matrix(classes, dim, world):
    full = _block_normal_reference(classes, dim, 0, classes, 7, 1 << 16)  # the trainable head's starting weights
    for rank in range(world):
        head = AdaDistillHead(CombinedMarginLoss(), dim, classes, seed=7, rank=rank, world_size=world)
        assert torch.equal(head.weight, full[head.class_start:head.class_start + head.num_local])


def _mapped_head_step(rank, world, path, dtype_name):
    """One step of a head whose centres are read from `path` for this rank's class range only."""
    from kd_plugin.methods.heads import PartialFCHead
    torch.manual_seed(0)
    emb, labels = torch.randn(12, 32), torch.randint(0, 500, (12,))
    rows = torch.arange(12).chunk(world)[rank]
    local = emb[rows].clone().requires_grad_(True)
    head = PartialFCHead(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 32, 500, centres=path,
                         centre_dtype=getattr(torch, dtype_name))
    loss = head(local, labels[rows])
    loss.backward()
    return float(loss), local.grad, head.class_start, head.weight.clone()


@pytest.mark.parametrize("layout", ["file", "shards"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_class_range_centres_read_from_files_give_one_process_losses(tmp_path, layout, dtype_name):
    from kd_plugin.teachers.classifier import save_classifier
    torch.manual_seed(1)
    full = torch.randn(500, 32)
    if layout == "file":
        path = tmp_path / "centres.pt"
        save_classifier(full, str(path))
    else:  # the teacher's 3-GPU run: arcface_torch's checkpoint shards (uneven: 167, 167, 166)
        path = tmp_path
        for r, part in enumerate((full[:167], full[167:334], full[334:])):
            torch.save({"state_dict_softmax_fc": {"weight": part.clone()}}, tmp_path / f"checkpoint_gpu_{r}.pt")
    one = run_ranks(_mapped_head_step, 1, str(path), dtype_name)[0]
    two = run_ranks(_mapped_head_step, 2, str(path), dtype_name)
    normalized = torch.nn.functional.normalize(full, dim=1).to(getattr(torch, dtype_name))
    for loss, grad, start, weight in two:
        assert loss == pytest.approx(one[0], rel=1e-5)
        assert torch.equal(weight, normalized[start:start + len(weight)])  # only this rank's rows, in its dtype
    assert torch.allclose(torch.cat([two[0][1], two[1][1]]), one[1], atol=1e-6)


def _slices(rank, world, folder, cache_dir):
    from kd_plugin.teachers import load_cache
    from kd_plugin.centres.estimate import centres_from_cache, estimate_class_slice
    from test_teachers import _tiny_teacher
    ds = open_dataset(folder)
    online = estimate_class_slice(_tiny_teacher(), ds, batch_size=2, progress=False)
    cached = centres_from_cache(load_cache(cache_dir), ds.labels, ds.num_classes)
    return online, cached


def test_each_rank_estimates_only_its_class_range_and_the_union_is_one_process(tmp_path):
    from kd_plugin.distributed import class_range
    from kd_plugin.centres.estimate import estimate_centres
    from kd_plugin.teachers import build_cache
    from test_teachers import _tiny_teacher
    from test_train import make_faces
    data = make_faces(tmp_path / "faces", identities=7, per_identity=3)  # 21 images: uneven rounds across ranks
    ds = open_dataset(str(data))
    single = estimate_centres(_tiny_teacher(), ds, batch_size=2, progress=False)
    build_cache(_tiny_teacher(), ds, str(tmp_path / "cache"), "tiny", batch_size=4, progress=False)
    for world in (2, 3):
        for rank, (online, cached) in enumerate(run_ranks(_slices, world, str(data), str(tmp_path / "cache"))):
            start, count = class_range(7, rank, world)
            assert (online.start, cached.start, len(online.rows), len(cached.rows)) == (start, start, count, count)
            assert torch.allclose(online.rows, single[start:start + count], atol=1e-6)
            assert torch.allclose(cached.rows, single[start:start + count], atol=1e-3)  # the cache holds fp16


def test_a_resumed_run_reads_the_centres_it_estimated_instead_of_running_the_teacher_again(tmp_path, monkeypatch):
    import kd_plugin.centres.derived
    import kd_plugin.run.train
    from kd_plugin.run.config import resolve
    from test_train import KD, _config, _losses, _teacher, make_faces

    data = make_faces(tmp_path / "faces")
    kd = dict(KD, teacher=_teacher(tmp_path))
    kd_plugin.run.train.train(resolve(_config(data, tmp_path / "out", max_steps=2, kd=kd)))
    saved = tmp_path / "out" / "teacher_centres"
    assert sorted(p.name for p in saved.iterdir()) == ["rank_0_softmax_weight.json", "rank_0_softmax_weight.pt"]

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran over the dataset again")
    monkeypatch.setattr(kd_plugin.centres.derived, "estimate_class_slice", no_teacher)
    kd_plugin.run.train.train(resolve(_config(data, tmp_path / "out", max_steps=4, resume=True, kd=kd)))
    assert [e["step"] for e in _losses(tmp_path / "out")] == [1, 2, 3, 4]
    with pytest.raises(AssertionError, match="ran over the dataset again"):  # a fresh run estimates them anew
        kd_plugin.run.train.train(resolve(_config(data, tmp_path / "fresh", max_steps=1, kd=kd)))


def test_centre_dtype_and_teacher_autocast_are_reachable_from_a_config(tmp_path):
    from kd_plugin.run.config import resolve
    from kd_plugin.errors import KDPluginError
    from kd_plugin.run.train import Trainer
    from test_train import KD, _config, _teacher, make_faces

    data = make_faces(tmp_path / "faces")
    kd = dict(KD, teacher=_teacher(tmp_path), proxyless=dict(KD["proxyless"], dtype="float16"), teacher_amp="bfloat16")
    trainer = Trainer(resolve(_config(data, tmp_path / "out", max_steps=1, kd=kd)))
    assert trainer.objective.head.weight.dtype == torch.float16
    seen = []
    trainer.teacher.embedder.module.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    trainer.run()
    assert seen == [torch.bfloat16]  # the teacher's forward ran under bf16 autocast (its output is cast to fp32 after)
    for bad, message in (({"proxyless": {"centres": "estimate", "dtype": "float8"}},
                          r"kd.proxyless.dtype = 'float8': the inherited centres are held in one of float32, float16"),
                         ({"method": "ekd"}, r"config.kd.proxyless = .*the settings of ProxylessKD, and method 'ekd' "
                                             r"does not run it")):
        with pytest.raises(KDPluginError, match=message):
            resolve({"rec": "x", "num_classes": 2, "kd": dict(kd, **bad)})


def test_the_scale_benchmark_prints_its_figures_as_json(capsys):
    """Structure only, at a small size: the figures themselves come from `kd-plugin bench scale --json`."""
    from kd_plugin.cli import main
    assert main(["bench", "scale", "--records", "20000", "--rec-classes", "200", "--classes", "3000",
                 "--worlds", "1,2", "--big-records", "30000", "--big-classes", "1500", "--index-records", "200000",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["rec_open_seconds_20m"]) == {"1", "4"} and len(result["rec_open_seconds_20m"]["4"]) == 4
    assert result["label_index_writers"] == 1
    assert result["records"] == 20000 and result["rec_open_seconds"] > 0 and result["records_per_second"] > 0
    for key in ("classifier", "adadistill", "centres"):
        ratios = result[f"{key}_rank_memory_ratio"]
        assert set(ratios) == {"1", "2"} and all(r > 0 for r in ratios.values())
        assert len(result[f"{key}_runs"]["2"]["added_bytes"]) == 2
    assert result["classifier_runs"]["1"]["dtype_bytes"] == 2 and result["centres_runs"]["1"]["dtype_bytes"] == 4
    assert set(result["per_gpu_on_8_gpus"]) == {"MS1MV3", "Glint360K", "WebFace42M"}


def test_a_full_header_read_leaves_a_label_index_that_the_next_open_uses(tmp_path, monkeypatch):
    import kd_plugin.data.datasets as datasets
    monkeypatch.setattr(datasets, "LABEL_INDEX_MIN_RECORDS", 100)
    write_synthetic_rec(str(tmp_path), 1_000, 10, ranges=False)  # im2rec's layout: no identity ranges
    first = open_dataset(str(tmp_path))
    assert (tmp_path / "train.kd_labels.npz").is_file()
    reads = []
    real = RecordIOReader.read_header
    monkeypatch.setattr(RecordIOReader, "read_header", lambda self, key: reads.append(key) or real(self, key))
    again = open_dataset(str(tmp_path))
    assert len(reads) == 1 and np.array_equal(again.labels, first.labels)  # only the first record was read
    with open(tmp_path / "train.rec", "ab") as f:  # the .rec changed: the index no longer applies
        f.write(b"\0" * 4)
    reads.clear()
    assert np.array_equal(open_dataset(str(tmp_path)).labels, first.labels) and len(reads) > 1000


def test_a_malformed_idx_line_is_named_even_when_the_numbers_add_up(tmp_path):
    from kd_plugin.data.recordio import read_idx
    from kd_plugin.errors import DataFormatError
    (tmp_path / "x.idx").write_text("0\t0\t40\n1\n2\t80\n")  # six numbers on three lines, but not two per line
    with pytest.raises(DataFormatError, match="x.idx, line 2: expected 'key<TAB>offset'"):
        read_idx(str(tmp_path / "x.idx"))


def test_a_broken_label_index_is_ignored(tmp_path, monkeypatch):
    import kd_plugin.data.datasets as datasets
    monkeypatch.setattr(datasets, "LABEL_INDEX_MIN_RECORDS", 100)
    write_synthetic_rec(str(tmp_path), 1_000, 10, ranges=False)
    (tmp_path / "train.kd_labels.npz").write_bytes(b"")  # an interrupted write elsewhere, say
    assert np.bincount(open_dataset(str(tmp_path)).labels).tolist() == [100] * 10
    assert (tmp_path / "train.kd_labels.npz").stat().st_size > 0  # rewritten from the headers


@pytest.mark.parametrize("per_class", [1, 2, 7])
def test_past_2_to_the_24_the_rounded_identity_ranges_are_resolved_by_reading_a_few_records(tmp_path, monkeypatch,
                                                                                          per_class):
    """Keys from 2^24 - 200 on: the header's and the ranges' float32 keys are rounded as insightface's are; the labels
    still come from the ranges, each rounded boundary settled by reading the records that round to it."""
    classes = 600 // per_class
    write_synthetic_rec(str(tmp_path), classes * per_class, classes, first_key=(1 << 24) - 200)
    reads = []
    real = RecordIOReader.read_header
    monkeypatch.setattr(RecordIOReader, "read_header", lambda self, key: reads.append(key) or real(self, key))
    ds = open_dataset(str(tmp_path))
    assert np.array_equal(ds.labels, np.repeat(np.arange(classes), per_class))
    assert ds.keys == list(range((1 << 24) - 199, (1 << 24) - 199 + classes * per_class))
    rounded = sum(1 for c in range(classes) if (1 << 24) - 199 + c * per_class > (1 << 24))
    assert len(reads) <= 1 + 64 + 2 + 3 * rounded  # header, the 64 checks, the header's ends, <= 3 per boundary
    assert not (tmp_path / "train.kd_labels.npz").exists()  # nothing to save: no full read happened


def _open_in_group(rank, world, folder, output):
    import kd_plugin.data.datasets as datasets
    from kd_plugin.data.datasets import open_training_data

    datasets.LABEL_INDEX_MIN_RECORDS = 100
    real_replacing = datasets.replacing

    def read_only_folder(path):  # the dataset folder refuses writes, as a read-only mount does (even for root)
        if path.startswith(folder):
            raise OSError(30, "Read-only file system", path)
        return real_replacing(path)
    datasets.replacing = read_only_folder
    reads = []
    real = RecordIOReader.read_header
    RecordIOReader.read_header = lambda self, key: reads.append(key) or real(self, key)
    ds = open_training_data(folder, index_dir=output)
    return ds.labels, ds.keys, len(reads), datasets.LABEL_INDEX_WRITES


def test_one_rank_reads_the_labels_and_a_read_only_dataset_folder_keeps_the_index_in_the_output(tmp_path):
    data, output = tmp_path / "data", tmp_path / "out"
    write_synthetic_rec(str(data), 1_000, 10, ranges=False)
    ranks = run_ranks(_open_in_group, 2, str(data), str(output))
    for labels, keys, reads, writes in ranks:
        assert np.array_equal(labels, np.repeat(np.arange(10), 100)) and keys == list(range(1000))
    assert [r[2] for r in ranks] == [1001, 0] and [r[3] for r in ranks] == [1, 0]  # rank 0 alone read and wrote
    assert len(list((output / "label_index").iterdir())) == 1
    again = run_ranks(_open_in_group, 2, str(data), str(output))
    assert [r[2] for r in again] == [1, 0] and [r[3] for r in again] == [0, 0]  # the index in the output was used
