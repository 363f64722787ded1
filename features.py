"""Feature cache for a frozen encoder: every image encoded once into an HDF5 file of float16 grids.

A cache file holds the dataset `features` (N, P, C) float16 and the attribute `fingerprint`, a hash
of the encoder's weights and configuration and of the image file it was computed from. It is
written under a temporary name and renamed when complete, so a partial cache is never read, and a
cache whose fingerprint differs from the current encoder and data is rebuilt.
"""
import hashlib
import os
import shutil

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from datasets import ImageCaptionsDataset, data_paths
from encoding import encode_images, encoding_plan
from utils import ToolkitError, atomic_path

CACHE_FORMAT = "features/1"
DISK_MARGIN_BYTES = 1 << 30  # leave 1 GiB free


def cache_path(cache_folder, data_name, split, backbone):
    """Where the feature cache of one split and backbone lives."""
    return os.path.join(cache_folder, f"{split}_FEATURES_{data_name}_{backbone}.hdf5")


def encoder_fingerprint(encoder, images_path):
    """Hash of everything the cached features depend on: encoder weights and grid, and the images."""
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(f"{encoder.backbone_name}|{encoder.encoded_image_size}".encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    stat = os.stat(images_path)
    with h5py.File(images_path, "r") as h5:
        digest.update(f"{stat.st_size}|{stat.st_mtime_ns}|{h5['images'].shape}".encode())
    return digest.hexdigest()


def cache_is_valid(path, fingerprint):
    """True when `path` is a complete cache made with exactly this fingerprint."""
    if not os.path.isfile(path):
        return False
    try:
        with h5py.File(path, "r") as h5:
            return h5.attrs.get("fingerprint") == fingerprint and "features" in h5
    except OSError:  # a foreign or damaged file: rebuild it
        return False


def feature_shape(encoder, image_size, device):
    """(P, C) of the encoder's output grid for square images of `image_size` pixels."""
    with torch.inference_mode():
        probe = torch.zeros(1, 3, image_size, image_size, device=device)
        grid = encoder(probe)  # (1, G, G, C)
    return grid.shape[1] * grid.shape[2], grid.shape[3]


def check_disk_space(folder, needed_bytes):
    """Refuse, with the sizes and the ways out, when the cache would not fit on the disk."""
    free = shutil.disk_usage(folder).free
    if needed_bytes + DISK_MARGIN_BYTES > free:
        raise ToolkitError(
            f"the feature cache needs {needed_bytes / 1e9:.1f} GB but {folder!r} has only "
            f"{free / 1e9:.1f} GB free; free some space, point cfg['cache_folder'] (--cache-folder) at a "
            f"larger disk, or train without the cache (cfg['feature_cache'] = False, --no-feature-cache)")


def ensure_feature_cache(encoder, data_folder, data_name, split, cache_folder=None, batch_size=32,
                         workers=0, device="cpu"):
    """Return the path of a valid feature cache for `split`, building it first when needed."""
    cache_folder = cache_folder or data_folder
    images_path = data_paths(data_folder, data_name, split)["images"]
    path = cache_path(cache_folder, data_name, split, encoder.backbone_name)
    fingerprint = encoder_fingerprint(encoder, images_path)
    if cache_is_valid(path, fingerprint):
        return path
    build_feature_cache(encoder, data_folder, data_name, split, path, fingerprint, batch_size, workers, device)
    return path


def build_feature_cache(encoder, data_folder, data_name, split, path, fingerprint, batch_size, workers, device):
    """Encode every image of `split` once and write the float16 grids atomically."""
    dataset = ImageCaptionsDataset(data_folder, data_name, split)
    image_size = dataset[0][0].shape[-1]
    was_training = encoder.training
    encoder.eval()
    positions, channels = feature_shape(encoder, image_size, device)
    needed = len(dataset) * positions * channels * 2
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    print(f"Caching {split} features of {encoder.backbone_name}: {len(dataset)} images x {positions} x "
          f"{channels} float16 = {needed / 1e9:.2f} GB in {path}")
    check_disk_space(os.path.dirname(os.path.abspath(path)), needed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        features = h5.create_dataset("features", (len(dataset), positions, channels), dtype="float16",
                                     chunks=(1, positions, channels))
        start = 0
        plan = encoding_plan(encoder, image_size, min(batch_size, len(dataset)))
        with torch.inference_mode():
            for images, _, _ in tqdm(loader, desc=f"encode {split}", unit="batch"):
                grid = encode_images(encoder, images.to(device), plan)  # (B, G, G, C)
                batch = grid.reshape(grid.size(0), positions, channels).half().cpu().numpy()
                features[start:start + len(batch)] = batch
                start += len(batch)
        h5.attrs["fingerprint"] = fingerprint
        h5.attrs["backbone"] = encoder.backbone_name
    encoder.train(was_training)
    return path


def read_features(path, index):
    """The cached (P, C) float16 grid of one image, as a numpy array (for inspection and tests)."""
    with h5py.File(path, "r") as h5:
        return np.asarray(h5["features"][index])
