"""The DataLoaders of a training run: grouped images (or their cached features) with all their captions, or
the course's one caption an item; each process of a multi-process run reads its own share."""
import os

import torch

from datasets import CaptionDataset, ImageCaptionsDataset
from distributed import shard_indices
from utils import loader_worker_init


def default_workers(cfg):
    """cfg['workers'], or min(4, cores) when it is None."""
    return cfg["workers"] if cfg["workers"] is not None else min(4, os.cpu_count() or 1)


class WithImageIndex(torch.utils.data.Dataset):
    """A dataset whose items end with their own index (SCST looks up each image's references by it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], index)


class TrainingData:
    """The train and val loaders of a run, the val items this process evaluates, and the image size."""

    def __init__(self, cfg, ranks, features=None, with_image_index=False, pin_memory=False):
        """`features`: {"TRAIN": path, "VAL": path} of feature caches to read instead of the images."""
        workers = default_workers(cfg)
        # loader_worker_init: the SIGTERM of the process group is the main process's to handle (utils.py)
        options = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": workers > 0,
                   "worker_init_fn": loader_worker_init if workers > 0 else None}
        if not cfg["group_captions"]:
            train = CaptionDataset(cfg["data_folder"], cfg["data_name"], "TRAIN")
            val = CaptionDataset(cfg["data_folder"], cfg["data_name"], "VAL")
            batch = cfg["batch_size"]
        else:
            features = features or {}
            train = ImageCaptionsDataset(cfg["data_folder"], cfg["data_name"], "TRAIN", features.get("TRAIN"))
            val = ImageCaptionsDataset(cfg["data_folder"], cfg["data_name"], "VAL", features.get("VAL"))
            batch = max(1, cfg["batch_size"] // train.captions_per_image)
        self.image_size = int(train.image(0).shape[-1])
        # Each rank reads every world_size-th item of the epoch's permutation, drawn from seed * 100_003 + epoch
        # (set_epoch): one process reads the same permutation as RandomSampler with that seed, and the order of
        # an epoch is the same whether the process started with it (a resume) or not. The loader's generator
        # (which draws the workers' seeds when they start) is another.
        sampler = torch.utils.data.distributed.DistributedSampler(
            train, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True, seed=cfg["seed"] * 100_003)
        # BatchNorm cannot train on a last batch of one image (every rank has as many items: the same choice).
        drop_last = len(sampler) % batch == 1
        # Validation: each rank its share of the val items, none twice (their metrics are gathered).
        self.val_indices = shard_indices(len(val), ranks.rank, ranks.world_size)
        if ranks.distributed:
            val = torch.utils.data.Subset(val, self.val_indices)
        if with_image_index:
            train = WithImageIndex(train)
        worker_seeds = torch.Generator().manual_seed(cfg["seed"])
        self.train = torch.utils.data.DataLoader(train, batch_size=batch, sampler=sampler, drop_last=drop_last,
                                                 generator=worker_seeds, **options)
        self.val = torch.utils.data.DataLoader(val, batch_size=batch, **options)
