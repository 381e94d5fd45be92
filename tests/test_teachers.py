"""Teacher classifiers in every layout, centre estimation, the embedding cache, safe checkpoint loading."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import assert_within_one_float16_unit, shared
from distributed_helpers import run_ranks
from kd_plugin.data import open_dataset
from kd_plugin.data.datasets import FaceDataset
from kd_plugin.distributed import class_range
from kd_plugin.errors import KDPluginError, UnsafePickleError
from kd_plugin.methods.heads import CombinedMarginLoss, PartialFCHead
from kd_plugin.normalization import IMAGENET_MEAN, IMAGENET_STD, InputNormalization
from kd_plugin.centres.estimate import estimate_centres
from kd_plugin.teachers import build_cache, load_cache, load_embedder, read_classifier, save_classifier
from kd_plugin.checkpoints import safe_torch_load
from kd_plugin.teachers.torch_embedder import TorchEmbedder


def _save_shards(folder, weight, ranks, layout):
    os.makedirs(folder, exist_ok=True)
    for r in range(ranks):
        start, count = class_range(len(weight), r, ranks)
        shard = weight[start:start + count].clone()
        if layout == "checkpoint":  # what train_v2.py writes with save_all_states
            torch.save({"epoch": 3, "global_step": 10, "state_dict_backbone": {"x": torch.zeros(1)},
                        "state_dict_softmax_fc": {"weight": shard}}, os.path.join(folder, f"checkpoint_gpu_{r}.pt"))
        else:  # older model-zoo releases, with momentum files beside them
            torch.save(shard, os.path.join(folder, f"rank_{r}_softmax_weight.pt"))
            torch.save(torch.zeros_like(shard), os.path.join(folder, f"rank_{r}_softmax_weight_mom.pt"))


@pytest.fixture(scope="module")
def classifier():
    return torch.randn(1000, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", ["checkpoint", "rank"])
def test_eight_shards_reassemble_and_slice_for_any_world_size(tmp_path, classifier, layout):
    _save_shards(tmp_path, classifier, 8, layout)
    full = read_classifier(str(tmp_path), num_classes=1000, embedding_size=64)
    assert torch.equal(full, classifier)
    name = "checkpoint_gpu_3.pt" if layout == "checkpoint" else "rank_3_softmax_weight.pt"
    assert torch.equal(read_classifier(str(tmp_path / name)), classifier)  # one shard names the whole set
    for world in (1, 2, 3):
        ranges = [class_range(1000, r, world) for r in range(world)]  # contiguous, in rank order, covering all
        assert [start for start, _ in ranges] == [0, *(s + c for s, c in ranges[:-1])]
        assert sum(count for _, count in ranges) == 1000


def _head_slice(rank, world, folder):
    head = PartialFCHead(CombinedMarginLoss(), 64, 1000, centres=folder)
    return head.class_start, head.weight.clone()


@pytest.mark.parametrize("world", [2, 3])
def test_student_ranks_take_their_class_range_from_the_teacher_shards(tmp_path, classifier, world):
    _save_shards(tmp_path, classifier, 8, "checkpoint")
    normalized = torch.nn.functional.normalize(classifier, dim=1)
    for rank, (start, weight) in enumerate(run_ranks(_head_slice, world, str(tmp_path))):
        expected_start, count = class_range(1000, rank, world)
        assert start == expected_start and torch.allclose(weight, normalized[start:start + count])


def test_class_count_and_dimension_mismatches_name_both_numbers(tmp_path, classifier):
    _save_shards(tmp_path, classifier, 8, "rank")
    with pytest.raises(KDPluginError, match=r"has 1000 classes \(8 shards .*\) but the dataset has 1001"):
        read_classifier(str(tmp_path), num_classes=1001)
    with pytest.raises(KDPluginError, match="embedding size 64 but the student's is 128"):
        read_classifier(str(tmp_path), embedding_size=128)
    os.remove(tmp_path / "rank_5_softmax_weight.pt")
    with pytest.raises(KDPluginError, match=r"missing rank\(s\) \[5\]"):
        read_classifier(str(tmp_path))


def test_single_file_layouts(tmp_path, classifier):
    torch.save(classifier, tmp_path / "full.pt")
    torch.save({"kernel": classifier.T.clone()}, tmp_path / "header.pth")  # PocketNet/AdaDistill: (d, C)
    save_classifier(classifier, str(tmp_path / "ours.pt"), source="test")
    for name in ("full.pt", "header.pth", "ours.pt"):
        assert torch.equal(read_classifier(str(tmp_path / name), 1000, 64), classifier), name
    assert torch.load(tmp_path / "ours.pt", weights_only=True)["num_classes"] == 1000


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2, 2), "evil": _RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="evil.pt: refused to load"):
        safe_torch_load(str(tmp_path / "evil.pt"))
    with pytest.raises(UnsafePickleError):
        read_classifier(str(tmp_path / "evil.pt"))
    assert not marker.exists()


class TinyNet(torch.nn.Module):
    """A deterministic stand-in teacher: pooled pixels through a fixed linear map."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, dim)
        torch.nn.init.normal_(self.fc.weight, generator=torch.Generator().manual_seed(1))
        torch.nn.init.normal_(self.fc.bias, generator=torch.Generator().manual_seed(2))

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))


def _tiny_teacher():
    return TorchEmbedder(TinyNet(), InputNormalization())


def test_centres_are_means_of_normalized_image_and_flip_embeddings(image_folder):
    ds = open_dataset(str(image_folder))
    centres = estimate_centres(_tiny_teacher(), ds, batch_size=4, progress=False)
    teacher = _tiny_teacher()
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    unit = lambda e: e / e.norm(dim=1, keepdim=True)  # noqa: E731
    both = unit(teacher.embed(images)) + unit(teacher.embed(images.flip(3)))
    for cls in range(3):
        mean = both[torch.from_numpy(ds.labels == cls)].mean(0)
        assert torch.allclose(centres[cls], mean / mean.norm(), atol=1e-6)


def _ranked_centres_and_cache(rank, world, folder, cache_dir):
    ds = open_dataset(folder)
    centres = estimate_centres(_tiny_teacher(), ds, batch_size=2, progress=False)
    build_cache(_tiny_teacher(), ds, cache_dir, "tiny", batch_size=2, progress=False)
    return centres


def test_distributed_centres_and_cache_equal_one_process(image_folder, tmp_path):
    ds = open_dataset(str(image_folder))
    single = estimate_centres(_tiny_teacher(), ds, batch_size=2, progress=False)
    build_cache(_tiny_teacher(), ds, str(tmp_path / "one"), "tiny", batch_size=2, progress=False)
    ranked = run_ranks(_ranked_centres_and_cache, 2, str(image_folder), str(tmp_path / "two"))
    for centres in ranked:
        assert torch.allclose(centres, single, atol=1e-6)
    one, two = load_cache(str(tmp_path / "one")), load_cache(str(tmp_path / "two"))
    everything = np.arange(len(ds))
    for flip in (False, True):  # the teacher's fp16 output may move by one unit with the batch it was computed in
        assert_within_one_float16_unit(one.get(everything, flip), two.get(everything, flip))
    # one part per rank, each written by its rank alone, and the meta that lists them
    assert sorted(os.listdir(tmp_path / "two")) == ["embeddings.part00000-of-00002.npy",
                                                    "embeddings.part00001-of-00002.npy", "meta.json"]


def test_cache_matches_online_teacher_and_refuses_mismatches(image_folder, tmp_path):
    ds = open_dataset(str(image_folder))
    build_cache(_tiny_teacher(), ds, str(tmp_path), "tiny", batch_size=4, progress=False)
    cache = load_cache(str(tmp_path), ds, teacher="tiny")
    teacher = _tiny_teacher()
    indices, flips = [0, 4, 8, 4], [False, True, False, False]
    images = torch.stack([ds[(i, f)][0] for i, f in zip(indices, flips)])
    online = teacher.embed(images)
    cached = cache.get(indices, flips)
    assert cached.dtype == torch.float32 and cached.shape == (4, 16)
    assert torch.allclose(cached, online, rtol=1e-3, atol=1e-3 * online.abs().max())
    with pytest.raises(KDPluginError, match="built with teacher 'tiny'"):
        load_cache(str(tmp_path), ds, teacher="r100:other.pth")
    (image_folder / "carol" / "003.jpg").unlink()
    with pytest.raises(KDPluginError, match="another dataset"):
        load_cache(str(tmp_path), open_dataset(str(image_folder)))
    os.rename(tmp_path / "meta.json", tmp_path / "moved.json")
    with pytest.raises(KDPluginError, match="no complete teacher cache"):
        load_cache(str(tmp_path))


class _FirstClasses(FaceDataset):
    """The images of classes 0..classes-1 of a dataset (labels unchanged): a smaller real set for the slow teacher."""

    def __init__(self, dataset: FaceDataset, classes: int) -> None:
        super().__init__(dataset.source, dataset.image_size)
        self.dataset, self.kept = dataset, np.flatnonzero(dataset.labels < classes)
        self._finish_labels(dataset.labels[self.kept], classes)

    def read_bytes(self, index: int) -> bytes:
        return self.dataset.read_bytes(int(self.kept[index]))

    def where(self, index: int) -> str:
        return self.dataset.where(int(self.kept[index]))


def test_real_teacher_centres_same_for_both_onnx_files():
    # 40 of the 249 identities: the fixed-batch-1 file embeds one image per call (the whole set took 73 s here)
    data = _FirstClasses(open_dataset(str(shared("celeba", "train.rec"))), 40)
    norm = InputNormalization(IMAGENET_MEAN, IMAGENET_STD)
    centres = []
    for name, batch in (("mobilefacenet_dynamic.onnx", 32), ("mobilefacenet_b1.onnx", 1)):
        teacher = load_embedder(str(shared("teachers", "mobilefacenet_ms1m", name)), norm, batch_size=batch,
                                onnx_on_cpu="onnxruntime")  # the two files as onnxruntime runs them
        centres.append(estimate_centres(teacher, data, batch_size=128, progress=False))
    assert centres[0].shape == (40, 128) and len(data) > 500
    assert torch.allclose(centres[0].norm(dim=1), torch.ones(40), atol=1e-5)
    assert (centres[0] - centres[1]).abs().max() < 1e-4
