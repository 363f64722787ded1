"""Length-bucketed batches (cfg length_bucket_pool): every item once an epoch, batches of similar lengths, the same
order for the same seed and epoch, each rank its own share; a training run that uses them."""
import numpy as np
import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

import solver
from benchmarks.step_counts import graphed_positions
from checkpoints import load_checkpoint
from config import validate_cfg
from distributed import Ranks
from loaders import LengthBucketedBatches, TrainingData, set_epoch
from tests.conftest import tiny_cfg

ITEMS = 103


def bucketed(lengths, batch_size=8, pool=4, rank=0, world_size=1, epoch=0, seed=7):
    """The batches of one epoch."""
    items = DistributedSampler(range(len(lengths)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    batches = LengthBucketedBatches(items, lengths, batch_size, pool, seed)
    batches.set_epoch(epoch)
    return list(batches), len(batches)


def random_lengths(count=ITEMS, seed=0):
    return torch.randint(3, 40, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def spread(batches, lengths):
    """Mean over the batches of (longest - shortest) length."""
    return sum(max(lengths[i] for i in batch) - min(lengths[i] for i in batch) for batch in batches) / len(batches)


def test_every_item_comes_once_in_batches_of_similar_length():
    lengths = random_lengths()
    batches, count = bucketed(lengths)
    assert sorted(i for batch in batches for i in batch) == list(range(ITEMS))
    assert count == len(batches) == 13 and all(len(batch) <= 8 for batch in batches)
    plain = [list(range(ITEMS))[start:start + 8] for start in range(0, ITEMS, 8)]  # any order of the same items
    assert spread(batches, lengths) < spread(plain, lengths) / 3
    # within a pool of 4 batches the lengths are sorted: a batch's items are all at most the next batch's
    pools = [sorted(batches[p:p + 4], key=lambda batch: min(lengths[i] for i in batch)) for p in (0, 4, 8)]
    for pool in pools:
        for low, high in zip(pool, pool[1:]):
            assert max(lengths[i] for i in low) <= min(lengths[i] for i in high)


def test_the_order_follows_the_seed_and_the_epoch():
    lengths = random_lengths()
    assert bucketed(lengths, epoch=3) == bucketed(lengths, epoch=3)
    assert bucketed(lengths, epoch=3)[0] != bucketed(lengths, epoch=4)[0]
    assert bucketed(lengths, seed=1)[0] != bucketed(lengths, seed=2)[0]


def test_a_last_batch_of_one_item_is_dropped_as_in_plain_batches():
    lengths = random_lengths(97)  # 97 = 12 x 8 + 1
    batches, count = bucketed(lengths)
    assert count == len(batches) == 12 and sum(map(len, batches)) == 96


def test_each_rank_takes_its_own_share():
    lengths = random_lengths()
    (first, first_count), (second, second_count) = (bucketed(lengths, rank=rank, world_size=2) for rank in (0, 1))
    assert first_count == second_count == len(first) == len(second)
    items = [i for batch in first + second for i in batch]
    assert set(items) == set(range(ITEMS)) and len(items) == 104  # DistributedSampler pads to an even share


def test_the_training_loader_batches_by_length_and_a_run_trains_with_it(tiny_shapes, tmp_path):
    cfg = validate_cfg(tiny_cfg(tiny_shapes, tmp_path, batch_size=20, length_bucket_pool=2, epochs=2))
    loader = TrainingData(cfg, Ranks()).train
    set_epoch(loader, 0)
    batches = list(loader)  # grouped: (images, captions (B, 5, L), lengths (B, 5))
    assert len(batches) == len(loader) and sum(len(batch[2]) for batch in batches) == 24
    assert all(len(batch[2]) <= 4 for batch in batches)  # 20 captions: 4 images of 5
    longest = [batch[2].amax(dim=1).tolist() for batch in batches]  # each image's longest caption, per batch
    for pool in (sorted(longest[p:p + 2]) for p in range(0, len(longest), 2)):  # pools of 2 batches
        assert max(pool[0]) <= min(pool[1])
    run = solver.train(cfg)
    history = load_checkpoint(run["last_checkpoint"])["history"]
    assert len(history["epoch"]) == 2 and all(torch.isfinite(torch.tensor(history["val_loss"])))


def test_graphed_positions_count_each_segments_rows_for_its_steps():
    decode_lengths = np.full((4, 5), 3)
    decode_lengths[0, 0] = 17  # 4 images x 5 captions: 17 + 19 x 3 = 74 positions needed
    # together: the 20 captions for the first 16 steps, then 16 rows (a segment's fewest) for the next 16
    assert graphed_positions(decode_lengths, [[0, 1, 2, 3]]) == pytest.approx((20 * 16 + 16 * 16) / 74)
    # apart: the long caption's 5 rows for two segments, the 15 short captions for one
    assert graphed_positions(decode_lengths, [[0], [1, 2, 3]]) == pytest.approx((5 * 16 * 2 + 15 * 16) / 74)
