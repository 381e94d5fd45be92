"""Files a job shares, on any node layout: a folder that is not shared between ranks stops the run at start-up with
what to do (not a hang); every "reuse or build" choice is one decision for all ranks; a torn part set is refused
naming the part. Node-local disks are emulated by giving each gloo rank its own folder, and a file one node cannot
see by making the reader fail on rank 1 only."""

from __future__ import annotations

import os

import numpy as np
import pytest

from distributed_helpers import run_ranks
from kd_plugin.errors import KDPluginError
from test_train import KD, _config, _teacher, ensure_registered, make_faces

GROUP_TIMEOUT = 60  # seconds: a rank left waiting in a collective fails the test instead of hanging it


def _trainer_or_error(config):
    from kd_plugin.run.config import resolve
    from kd_plugin.run.train import Trainer

    ensure_registered()
    try:
        trainer = Trainer(resolve(config))
    except KDPluginError as exc:
        return str(exc)
    return trainer


def _rank_private_output(rank, world, data, teacher, root):
    os.environ["KD_PLUGIN_SHARED_WAIT"] = "1"
    kd = dict(KD, teacher=teacher, proxyless={"centres": "fit", "fit": {"epochs": 1, "batch_size": 256, "lr": 0.1}})
    result = _trainer_or_error(_config(data, os.path.join(root, f"node{rank}"), batch_size=4, kd=kd))
    return result if isinstance(result, str) else "trained"


def test_rank_private_output_folders_stop_the_run_at_start_up_with_the_shared_folder_message(tmp_path):
    data, teacher = make_faces(tmp_path / "faces"), _teacher(tmp_path)
    messages = run_ranks(_rank_private_output, 2, str(data), teacher, str(tmp_path), timeout=GROUP_TIMEOUT)
    for rank, message in enumerate(messages):
        assert "the teacher cache folder must be one folder every rank reads and writes, but rank(s) [1] do not see " \
               "the file rank 0 wrote there" in message, (rank, message)
        assert "not shared between this job's nodes" in message
    # stopped before the teacher embedded anything: no part of a cache was written
    assert not any(name.startswith("embeddings") for node in ("node0", "node1")
                   for name in os.listdir(tmp_path / node / "teacher_cache"))


def _build_two_parts(rank, world, data, teacher, out):
    from kd_plugin.data.datasets import open_dataset
    from kd_plugin.teachers import build_cache, load_embedder

    ensure_registered()
    build_cache(load_embedder(teacher), open_dataset(data), out, "t", batch_size=4, progress=False)


def test_a_torn_cache_is_refused_naming_the_part(tmp_path):
    from kd_plugin.teachers import load_cache

    data, teacher, out = make_faces(tmp_path / "faces"), _teacher(tmp_path), tmp_path / "cache"
    run_ranks(_build_two_parts, 2, str(data), teacher, str(out), timeout=GROUP_TIMEOUT)
    whole = load_cache(str(out)).get(np.arange(48), False)
    part1 = out / "embeddings.part00001-of-00002.npy"
    kept = part1.read_bytes()
    part1.write_bytes(kept[:-64])  # cut short
    with pytest.raises(KDPluginError, match=r"embeddings.part00001-of-00002.npy: part 1 of 2 holds \d+ bytes, .*"
                                            r"meta.json records \d+ \(cut short or overwritten\)"):
        load_cache(str(out)).get(np.arange(48), False)
    part1.unlink()
    with pytest.raises(KDPluginError, match=r"embeddings.part00001-of-00002.npy: part 1 of 2 listed in .*meta.json "
                                            r"is missing; the set is torn"):
        load_cache(str(out))
    part1.write_bytes(kept)
    assert np.array_equal(load_cache(str(out)).get(np.arange(48), False), whole)


def _fit_run(rank, world, data, teacher, output, blind_rank, cache=None):
    """A 'fit' run (or one on kd.cache) where `blind_rank` cannot open the teacher cache: returns what it built."""
    import kd_plugin.run.build
    import kd_plugin.centres.derived
    from kd_plugin.teachers import cache as cache_module

    ensure_registered()
    built = []
    original_build, original_load = kd_plugin.centres.derived.build_cache, cache_module.load_cache

    def counting_build(*args, **kwargs):
        built.append(rank)
        return original_build(*args, **kwargs)

    def blind_load(directory, *args, **kwargs):
        if rank == blind_rank and not built:
            raise KDPluginError(f"{directory}: no complete teacher cache here (meta.json missing)")
        return original_load(directory, *args, **kwargs)
    kd_plugin.centres.derived.build_cache, kd_plugin.centres.derived.load_cache = counting_build, blind_load
    kd_plugin.run.build.load_cache = blind_load  # kd.cache is opened where the teacher feed is built
    kd = dict(KD, teacher=teacher, proxyless={"centres": "fit", "fit": {"epochs": 1, "batch_size": 256, "lr": 0.1}})
    if cache is not None:
        kd = dict(KD, teacher=teacher, cache=cache)
    result = _trainer_or_error(_config(data, output, batch_size=4, kd=kd))
    return result if isinstance(result, str) else {"built": len(built)}


def test_reuse_or_build_is_one_decision_for_every_rank(tmp_path):
    data, teacher, output = make_faces(tmp_path / "faces"), _teacher(tmp_path), str(tmp_path / "run")
    first = run_ranks(_fit_run, 2, str(data), teacher, output, None, timeout=GROUP_TIMEOUT)
    assert first == [{"built": 1}, {"built": 1}]  # no cache yet: both ranks build it
    reused = run_ranks(_fit_run, 2, str(data), teacher, output, None, timeout=GROUP_TIMEOUT)
    assert reused == [{"built": 0}, {"built": 0}]  # both see it: both reuse it
    blind = run_ranks(_fit_run, 2, str(data), teacher, output, 1, timeout=GROUP_TIMEOUT)
    assert blind == [{"built": 1}, {"built": 1}]  # rank 1 cannot see it: both rebuild, neither hangs
    # a cache the user names (kd.cache) that rank 1 cannot open: both ranks stop with rank 1's message
    cache = os.path.join(output, "teacher_cache")
    stopped = run_ranks(_fit_run, 2, str(data), teacher, str(tmp_path / "other"), 1, cache, timeout=GROUP_TIMEOUT)
    assert stopped == [f"rank 1: {cache}: no complete teacher cache here (meta.json missing)"] * 2
