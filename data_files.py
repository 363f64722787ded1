"""Names of the data files: what create_input_files.py writes, datasets.py reads and features.py caches;
and how their HDF5 files are written.

With base name `<dataset>_<cpi>_cap_per_img_<min_word_freq>_min_word_freq` (the course's `data_name`):
`WORDMAP_<base>.json`, `{SPLIT}_{IMAGES,CAPTIONS,CAPLENS,REFS}_<base>.{hdf5,json}` and, for a frozen
encoder, `{SPLIT}_FEATURES_<base>_<backbone>.hdf5`.
"""
import contextlib
import os
import re

import h5py

from utils import ToolkitError

SPLITS = ("TRAIN", "VAL", "TEST")
SPLIT_FILE_KINDS = (("IMAGES", "hdf5"), ("CAPTIONS", "json"), ("CAPLENS", "json"), ("REFS", "json"))
DATA_NAME = re.compile(r"(?P<dataset>.+)_(?P<cpi>\d+)_cap_per_img_(?P<min_word_freq>\d+)_min_word_freq")


def base_name(dataset, captions_per_image, min_word_freq):
    """The name shared by all output files of one run (the course's `data_name`)."""
    return f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"


def output_paths(output_folder, base):
    """{key: path} of every output file; keys are "WORDMAP" and e.g. ("TRAIN", "IMAGES")."""
    paths = {"WORDMAP": os.path.join(output_folder, f"WORDMAP_{base}.json")}
    for split in SPLITS:
        for kind, extension in SPLIT_FILE_KINDS:
            paths[split, kind] = os.path.join(output_folder, f"{split}_{kind}_{base}.{extension}")
    return paths


def check_split(split):
    if split not in SPLITS:
        raise ToolkitError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def data_paths(data_folder, data_name, split):
    """{"images", "captions", "caplens", "refs"}: the paths of one split's files."""
    split = check_split(split)
    paths = output_paths(data_folder, data_name)
    return {kind.lower(): paths[split, kind] for kind, _ in SPLIT_FILE_KINDS}


def wordmap_path(data_folder, data_name):
    return output_paths(data_folder, data_name)["WORDMAP"]


def feature_cache_path(cache_folder, data_name, split, backbone):
    """Where the feature cache of one split and backbone lives."""
    return os.path.join(cache_folder, f"{check_split(split)}_FEATURES_{data_name}_{backbone}.hdf5")


def creation_command(data_folder, data_name):
    """The create_input_files.py command line that writes `data_name` into `data_folder`."""
    match = DATA_NAME.fullmatch(data_name)
    if not match:
        return (f"python create_input_files.py --dataset DATASET ... --output-folder {data_folder} "
                f"(data names look like coco_5_cap_per_img_5_min_word_freq)")
    dataset = match["dataset"]
    inputs = "" if dataset == "shapes" else " --karpathy-json PATH --image-folder DIR"
    return (f"python create_input_files.py --dataset {dataset}{inputs} --output-folder {data_folder} "
            f"--captions-per-image {match['cpi']} --min-word-freq {match['min_word_freq']}")


@contextlib.contextmanager
def new_hdf5_file(path):
    """Yield h5py.File(path, "w"), closed on the way out, with a full disk reported as the OSError it is.

    After a failed write h5py fails to close the file too, with a RuntimeError that would hide the first
    error: that one is dropped. A write that fails while closing (metadata) also comes as a RuntimeError:
    it is raised as an OSError, so that utils.atomic_path recognises a full disk in its text.
    """
    h5 = h5py.File(path, "w")
    try:
        yield h5
    except BaseException:
        with contextlib.suppress(RuntimeError, OSError):
            h5.close()
        raise
    try:
        h5.close()
    except RuntimeError as error:
        raise OSError(str(error)) from None
