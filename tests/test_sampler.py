"""Identity-balanced distributed batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
from distributed_helpers import run_ranks
from kd_plugin.data.sampler import IdentityBalancedBatchSampler

# 40 identities with 1..6 images each (identities with one image cannot give positives)
LABELS = np.repeat(np.arange(40), [1 + (i % 6) for i in range(40)])


def _sampler(rank, world=2, seed=7, **kw):
    args = dict(batch_size=20, identities_per_batch=3, images_per_identity=4)
    args.update(kw)
    return IdentityBalancedBatchSampler(LABELS, seed=seed, rank=rank, world_size=world, **args)


def test_fixed_batch_positives_and_random_coverage():
    samplers = [_sampler(r) for r in range(2)]
    random_part = []
    for rank, sampler in enumerate(samplers):
        batches = list(sampler)
        assert len(batches) == len(sampler) == int(np.ceil(len(LABELS) / (2 * 8)))
        for batch in batches:
            assert len(batch) == 20
            balanced = [LABELS[i] for i, _ in batch[8:]]
            groups = [balanced[g * 4:(g + 1) * 4] for g in range(3)]
            assert all(len(set(g)) == 1 for g in groups)  # P groups of K images of one identity
            assert len({g[0] for g in groups}) == 3  # P distinct identities
            # every group holds at least two distinct images: a real positive pair
            idx = [i for i, _ in batch[8:]]
            assert all(len(set(idx[g * 4:(g + 1) * 4])) >= 2 for g in range(3))
            random_part += [i for i, _ in batch[:8]]
    assert set(random_part) == set(range(len(LABELS)))  # every sample once per epoch (plus wrap-around padding)
    assert len(random_part) - len(LABELS) < 2 * 8


def test_deterministic_rank_dependent_and_epoch_dependent():
    a, b, other_rank = _sampler(0), _sampler(0), _sampler(1)
    assert list(a) == list(b)
    assert list(a)[0] != list(other_rank)[0]
    a.set_epoch(1)
    b.set_epoch(0)
    assert list(a) != list(b)
    flips = [f for batch in b for _, f in batch]
    assert 0 < sum(flips) < len(flips)
    assert not any(f for batch in _sampler(0, flip=False) for _, f in batch)


def test_resume_from_epoch_and_position():
    full = _sampler(1)
    full.set_epoch(3)
    expected = list(full)
    resumed = _sampler(1)
    resumed.load_state_dict(full.state_dict(position=2) | {"epoch": 3})
    assert len(resumed) == len(expected) - 2
    assert list(resumed) == expected[2:]
    assert list(resumed) == expected  # the next pass starts the epoch from its first batch
    # arcface_torch calls set_epoch at the top of every epoch: it must not lose a loaded position
    again = _sampler(1)
    again.load_state_dict({"epoch": 3, "position": 2, "seed": 7})
    again.set_epoch(3)
    assert len(again) == len(expected) - 2 and list(again) == expected[2:]
    again.load_state_dict({"epoch": 3, "position": 2, "seed": 7})
    again.set_epoch(4)  # another epoch starts from its beginning
    assert len(again) == len(expected)
    with pytest.raises(ValueError, match="seed"):
        _sampler(1, seed=8).load_state_dict({"epoch": 0, "position": 0, "seed": 7})


def test_invalid_settings_are_explained():
    with pytest.raises(ValueError, match="at least identities_per_batch"):
        _sampler(0, batch_size=10)
    with pytest.raises(ValueError, match="images_per_identity must be >= 2"):
        _sampler(0, images_per_identity=1)
    with pytest.raises(ValueError, match="only 33 identities"):
        _sampler(0, batch_size=200, identities_per_batch=34)


def _ranked_sampler(rank, world):
    sampler = IdentityBalancedBatchSampler(LABELS, batch_size=20, identities_per_batch=3, images_per_identity=4, seed=7)
    return sampler.rank, sampler.world_size, list(sampler)


def test_rank_and_world_come_from_the_process_group():
    for rank, (got_rank, world, batches) in enumerate(run_ranks(_ranked_sampler, 2)):
        assert (got_rank, world) == (rank, 2)
        assert batches == list(_sampler(rank))  # same as the explicitly ranked single-process sampler


def test_random_part_rows_of_the_gathered_batch():
    from kd_plugin.data.sampler import random_part_rows
    batches = [list(_sampler(r))[0] for r in range(2)]  # the first batch of each rank
    gathered_labels = [LABELS[i] for batch in batches for i, _ in batch]
    rows = random_part_rows([20, 20], random_size=8).tolist()
    assert rows == list(range(8)) + list(range(20, 28))
    assert random_part_rows([5, 20, 3], random_size=4).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 25, 26, 27]
    mask = [i in rows for i in range(40)]
    balanced = [lab for lab, m in zip(gathered_labels, mask) if not m]
    assert all(len(set(balanced[g * 4:(g + 1) * 4])) == 1 for g in range(6))  # the rest are the P x K groups


def test_two_ranks_together_draw_what_one_process_with_twice_the_batch_draws():
    one = IdentityBalancedBatchSampler(LABELS, batch_size=40, identities_per_batch=6, images_per_identity=4, seed=7,
                                       rank=0, world_size=1)
    two = [_sampler(r) for r in range(2)]  # batch 20 = 8 random + 3 x 4 per rank
    for step in range(len(two[0])):
        joint = one.batch(0, step)
        parts = [s.batch(0, step) for s in two]
        assert joint[:16] == parts[0][:8] + parts[1][:8]  # the random parts, in order, with their flips
        assert joint[16:] == parts[0][8:] + parts[1][8:]  # the P x K groups, with their picks and flips
