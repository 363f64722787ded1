"""Feature cache for a frozen encoder: every image encoded once into an HDF5 file of float16 grids.

A cache file holds the dataset `features` (N, P, C) float16 and the attribute `fingerprint`, a hash
of the encoder's weights and configuration and of the image file it was computed from. It is
written under a temporary name and renamed when complete, so a partial cache is never read, and a
cache whose fingerprint differs from the current encoder and data is rebuilt. A cache damaged after
it was built is rebuilt too, as far as a sample of its rows shows it (non-finite or all-zero rows);
an encoder whose features are non-finite or all zero is refused while the cache is built.
"""
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from data_files import data_paths, feature_cache_path, new_hdf5_file
from datasets import ImageCaptionsDataset, opened_images_file
from distributed import contiguous_slice
from encoding import encode_images, inference_plan
from utils import ToolkitError, atomic_path, check_free_space, format_bytes, loader_worker_init, remove_stale_temp_files

CACHE_FORMAT = "features/1"
DISK_MARGIN_BYTES = 1 << 30  # leave 1 GiB free
CHECKED_ROWS = 32  # rows of a cache checked on every open, evenly spread from the first to the last
JOIN_ROWS = 256  # grids copied at a time when the ranks' parts of a cache are joined


def encoder_fingerprint(encoder, images_path, data_folder, data_name):
    """Hash of everything the cached features depend on: encoder weights and grid, and the images."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(f"{encoder.backbone_name}|{encoder.encoded_image_size}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    stat = os.stat(images_path)
    with opened_images_file(images_path, data_folder, data_name) as images:
        digest.update(f"{stat.st_size}|{stat.st_mtime_ns}|{images.shape}".encode())
    return digest.hexdigest()


PROBLEMS = ("not finite (inf or NaN)", "all zero")  # what row_problems flags, in its order


def row_problems(rows):
    """(2, B) bools of a batch of features (B, P, C), numpy or a tensor on any device: the rows holding a
    non-finite value, the rows that are all zero (unusable either way)."""
    flat = torch.as_tensor(rows).flatten(1)  # (B, P * C)
    return torch.stack([~torch.isfinite(flat).all(dim=1), ~flat.ne(0).any(dim=1)])


def first_bad_row(problems):
    """(index, what is wrong) of the first unusable row in row_problems' answer (on the CPU); None if all are
    usable."""
    for flags, what in zip(problems, PROBLEMS):
        if flags.any():
            return int(flags.int().argmax()), what
    return None


def cache_problem(path, fingerprint):
    """None when `path` is a complete cache made with exactly this fingerprint whose checked rows are sound;
    else why it must be (re)built."""
    if not os.path.isfile(path):
        return "it does not exist"
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("fingerprint") != fingerprint or "features" not in h5:
                return "it was made from other weights or data, or is incomplete"
            features = h5["features"]
            checked = np.unique(np.linspace(0, len(features) - 1, min(CHECKED_ROWS, len(features))).astype(int))
            bad = first_bad_row(row_problems(features[checked]))  # h5py reads the rows in one selection
    except OSError as error:  # a foreign or damaged file: rebuild it
        return f"it cannot be read ({error})"
    return None if bad is None else f"it is damaged: the features of image {checked[bad[0]]} are {bad[1]}"


def feature_shape(encoder, image_size, device):
    """(P, C) of the encoder's output grid for square images of `image_size` pixels."""
    with torch.inference_mode():
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        grid = encoder(probe)  # (1, G, G, C)
    return grid.shape[1] * grid.shape[2], grid.shape[3]


def prepare_feature_caches(encoder, cfg, ranks, workers, splits=("TRAIN", "VAL")):
    """{split: path} of a valid feature cache of each split for the frozen `encoder`, built first where needed:
    by this process alone, or by all the ranks of a multi-process run together."""
    encoder.eval()
    if not ranks.distributed:
        return {split: ensure_feature_cache(encoder, cfg["data_folder"], cfg["data_name"], split, cfg["cache_folder"],
                                            batch_size=max(1, cfg["batch_size"]), workers=workers,
                                            device=ranks.device)
                for split in splits}
    return {split: shared_feature_cache(encoder, cfg, ranks, split, workers) for split in splits}


def shared_feature_cache(encoder, cfg, ranks, split, workers):
    """The feature cache of a split built by all ranks together: each encodes a contiguous slice into a part
    file of its own, then rank 0 joins them into the cache atomically while the others wait; no rank reads it
    before it is complete."""
    data_folder, data_name = cfg["data_folder"], cfg["data_name"]
    path = feature_cache_path(cfg["cache_folder"] or data_folder, data_name, split, encoder.backbone_name)
    fingerprint = encoder_fingerprint(encoder, data_paths(data_folder, data_name, split)["images"], data_folder,
                                      data_name)
    if ranks.from_main(lambda: cache_problem(path, fingerprint) is None):
        return path
    parts = [f"{path}.part{rank}of{ranks.world_size}" for rank in range(ranks.world_size)]
    start, end = contiguous_slice(len(ImageCaptionsDataset(data_folder, data_name, split)), ranks.rank,
                                  ranks.world_size)
    build_feature_cache(encoder, data_folder, data_name, split, parts[ranks.rank], fingerprint,
                        max(1, cfg["batch_size"]), workers, ranks.device, indices=range(start, end))
    ranks.barrier()
    if ranks.is_main:
        join_feature_parts(parts, path, fingerprint, encoder.backbone_name)
    ranks.barrier()
    return path


def ensure_feature_cache(encoder, data_folder, data_name, split, cache_folder=None, batch_size=32,
                         workers=0, device="cpu"):
    """Return the path of a valid feature cache for `split`, building it first when needed."""
    cache_folder = cache_folder or data_folder
    images_path = data_paths(data_folder, data_name, split)["images"]
    path = feature_cache_path(cache_folder, data_name, split, encoder.backbone_name)
    fingerprint = encoder_fingerprint(encoder, images_path, data_folder, data_name)
    problem = cache_problem(path, fingerprint)
    if problem is None:
        return path
    if os.path.exists(path):
        print(f"Rebuilding the feature cache {path!r}: {problem}")
    build_feature_cache(encoder, data_folder, data_name, split, path, fingerprint, batch_size, workers, device)
    return path


def build_feature_cache(encoder, data_folder, data_name, split, path, fingerprint, batch_size, workers, device,
                        indices=None):
    """Encode every image of `split` (or those at `indices`: one rank's share) once and write the float16
    grids atomically."""
    dataset = ImageCaptionsDataset(data_folder, data_name, split)
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    image_size = dataset[0][0].shape[-1]
    was_training = encoder.training
    encoder.eval()
    positions, channels = feature_shape(encoder, image_size, device)
    needed = len(dataset) * positions * channels * 2
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temp_files(os.path.dirname(os.path.abspath(path)))  # a killed build's leftover counts as used space
    print(f"Caching {split} features of {encoder.backbone_name}: {len(dataset)} images x {positions} x "
          f"{channels} float16 = {format_bytes(needed)} in {path}")
    check_free_space(os.path.dirname(os.path.abspath(path)), needed, f"the {split} feature cache",
                     margin_bytes=DISK_MARGIN_BYTES,
                     fix="free some space, point cfg['cache_folder'] (--cache-folder) at a larger disk, or train "
                         "without the cache (cfg['feature_cache'] = False, --no-feature-cache)")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda",
                                         worker_init_fn=loader_worker_init if workers > 0 else None)
    with atomic_path(path, needed_bytes=needed) as tmp, new_hdf5_file(tmp) as h5:
        features = h5.create_dataset("features", (len(dataset), positions, channels), dtype="float16")
        write_features(encoder, loader, inference_plan(device, batch_size), features, split)
        h5.attrs["fingerprint"] = fingerprint
        h5.attrs["backbone"] = encoder.backbone_name
    encoder.train(was_training)
    return path


def write_features(encoder, loader, plan, features, split):
    """Encode the loader's images into the HDF5 dataset `features` (N, P, C), in order. The next batch is read and
    encoded while a writer thread writes the previous one: the device never waits for the disk. (The loader's
    workers read: h5py runs one call at a time in a process, so a read here would wait for the write.) Each batch
    is checked where it was encoded (row_problems), and the check's answer travels to the host with it."""
    device, backbone = next(encoder.parameters()).device, encoder.backbone_name
    cuda = device.type == "cuda"
    start, pending = 0, None
    with ThreadPoolExecutor(max_workers=1) as writer:
        for images, _, _ in tqdm(loader, desc=f"encode {split}", unit="batch"):
            grid = encode_images(encoder, images.to(device, non_blocking=True), plan)  # (B, G, G, C)
            grid = grid.reshape(grid.size(0), -1, grid.size(-1)).half()  # (B, P, C)
            problems = row_problems(grid)  # (2, B)
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda).copy_(t, non_blocking=True)
                    for t in (grid, problems)]
            copied = torch.cuda.Event() if cuda else None
            if copied is not None:
                copied.record()
            if pending is not None:
                pending.result()  # the previous batch is written (or its error raised here)
            pending = writer.submit(write_rows, features, *host, copied, start, backbone, split)
            start += len(grid)
        if pending is not None:
            pending.result()


def write_rows(features, rows, problems, copied, start, backbone, split):
    """Write one batch of encoded rows (B, P, C) once its copy to the host is complete, unless one is unusable."""
    if copied is not None:
        copied.synchronize()
    check_encoded(problems, start, backbone, split)
    features[start:start + len(rows)] = rows.numpy()


def check_encoded(problems, start, backbone, split):
    """Refuse a batch of freshly encoded features whose row_problems flag a row (non-finite or all zero in
    float16): the encoder, not the training, is at fault."""
    bad = first_bad_row(problems)
    if bad is not None:
        raise ToolkitError(
            f"the frozen {backbone} encoder gives unusable features: those of {split} image {start + bad[0]} are "
            f"{bad[1]} in float16. A randomly initialised backbone "
            f"(encoder_weights None) with default BatchNorm statistics overflows: use pretrained weights "
            f"(cfg['encoder_weights'] = 'IMAGENET1K_V1', --encoder-weights IMAGENET1K_V1), or fine-tune the "
            f"encoder (which trains without the cache)")


def join_feature_parts(part_paths, path, fingerprint, backbone):
    """Concatenate the caches of consecutive slices of a split (one per rank) into the cache at `path`,
    atomically, and remove the parts."""
    with h5py.File(part_paths[0], "r") as first:
        _, positions, channels = first["features"].shape
    sizes = []
    for part in part_paths:
        with h5py.File(part, "r") as h5:
            sizes.append(len(h5["features"]))
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        features = h5.create_dataset("features", (sum(sizes), positions, channels), dtype="float16")
        start = 0
        for part, size in zip(part_paths, sizes):
            with h5py.File(part, "r") as source:
                for row in range(0, size, JOIN_ROWS):  # a few hundred grids in memory at a time
                    rows = source["features"][row:row + JOIN_ROWS]
                    features[start + row:start + row + len(rows)] = rows
            start += size
        h5.attrs["fingerprint"] = fingerprint
        h5.attrs["backbone"] = backbone
    for part in part_paths:
        os.remove(part)
    return path


def read_features(path, index):
    """The cached (P, C) float16 grid of one image, as a numpy array (for inspection and tests)."""
    with h5py.File(path, "r") as h5:
        return np.asarray(h5["features"][index])
