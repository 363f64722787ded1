"""Turn a Karpathy split JSON and its images into the course's HDF5 + JSON training files.

    python create_input_files.py --dataset coco --karpathy-json dataset_coco.json \
        --image-folder coco2014 --output-folder data/coco
    python create_input_files.py --dataset shapes --output-folder data/shapes

Outputs, with base name `<dataset>_<cpi>_cap_per_img_<min_word_freq>_min_word_freq`:
`{TRAIN,VAL,TEST}_IMAGES_<base>.hdf5` (dataset `images`, uint8 N x 3 x S x S, attribute
`captions_per_image`), `{SPLIT}_CAPTIONS_<base>.json`, `{SPLIT}_CAPLENS_<base>.json`,
`{SPLIT}_REFS_<base>.json` (every original sentence of each image, for the coco-caption metrics)
and `WORDMAP_<base>.json`. All of them appear together or not at all.
"""
import argparse
import collections
import contextlib
import ctypes
import dataclasses
import itertools
import json
import multiprocessing
import os
import random
import signal
import warnings

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from utils import ToolkitError, atomic_path, run_cli

DATASETS = ("coco", "flickr8k", "flickr30k", "shapes")
SPLITS = ("TRAIN", "VAL", "TEST")
KARPATHY_SPLITS = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}
SPECIAL_TOKENS = ("<unk>", "<start>", "<end>")  # ids after the words; "<pad>" is 0
CAPTION_SEED = 123  # the course's seed(123) for caption sampling
RESAMPLE = Image.Resampling.BILINEAR  # the course's scipy.misc.imresize default ('bilinear', via PIL)
MAX_LISTED_FILES = 5  # how many missing/bad files an error message names
BLOCK_IMAGES_PER_WORKER = 32  # a block (one round trip to the decoding workers) has 32 images per worker
# images per message to a worker: a quarter of its block, so the workers still share a block evenly; one
# image per message cost the parent ~0.2 ms of CPU each (pickling, routing), taken from the workers' 2 cores
IMAGES_PER_TASK = 8
# glibc mallopt parameters and the values a decoding worker sets (see keep_freed_memory)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
WORKER_MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's largest: buffers up to 32 MB come from the heap
WORKER_TRIM_THRESHOLD = 128 * 2 ** 20


@dataclasses.dataclass
class KarpathyImage:
    """One image of the split file: where it is, its id, and its sentences as token lists."""
    path: str
    image_id: int | str  # cocoid where the JSON has one, else the file name
    sentences: list  # every original sentence, for the REFS file
    captions: list  # the sentences of at most max_len tokens, to sample from


def base_name(dataset, captions_per_image, min_word_freq):
    """The name shared by all output files of one run (the course's `data_name`)."""
    return f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"


def output_paths(output_folder, base):
    """{key: path} of every output file; keys are "WORDMAP" and e.g. ("TRAIN", "IMAGES")."""
    paths = {"WORDMAP": os.path.join(output_folder, f"WORDMAP_{base}.json")}
    for split in SPLITS:
        for kind, extension in (("IMAGES", "hdf5"), ("CAPTIONS", "json"), ("CAPLENS", "json"),
                                ("REFS", "json")):
            paths[split, kind] = os.path.join(output_folder, f"{split}_{kind}_{base}.{extension}")
    return paths


# ---------------------------------------------------------------- reading the split file

def load_karpathy_json(path, dataset):
    """Read and check a Karpathy split file; return its list of image records."""
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise ToolkitError(f"Karpathy split file {path!r} does not exist; download caption_datasets.zip "
                           f"(http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip) "
                           f"and pass its dataset_{dataset}.json with --karpathy-json") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ToolkitError(f"cannot read Karpathy split file {path!r}: {error}") from None
    except json.JSONDecodeError as error:
        raise ToolkitError(f"{path!r} is not valid JSON ({error}); re-extract dataset_{dataset}.json "
                           f"from caption_datasets.zip") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise ToolkitError(f"{path!r} is not in Karpathy's format: it needs a top-level key 'images' "
                           f"holding a non-empty list; pass dataset_{dataset}.json from caption_datasets.zip")
    required_keys = ("split", "filename", "sentences") + (("filepath",) if dataset == "coco" else ())
    for index, image in enumerate(data["images"]):
        check_karpathy_image(path, index, image, required_keys)
    return data["images"]


def check_karpathy_image(path, index, image, required_keys):
    """Raise a ToolkitError naming the key and image index that break Karpathy's format."""
    def fail(problem):
        raise ToolkitError(f"{path!r} is not in Karpathy's format: image {index} ({where}) {problem}; "
                           f"pass the dataset_*.json file of caption_datasets.zip for this --dataset")

    where = image.get("filename", "no filename") if isinstance(image, dict) else "not an object"
    if not isinstance(image, dict):
        fail("is not a JSON object")
    for key in required_keys:
        if key not in image:
            fail(f"has no key {key!r}")
        if key != "sentences" and not isinstance(image[key], str):
            fail(f"has {key!r} = {image[key]!r}, not a string")
    if image["split"] not in KARPATHY_SPLITS:
        fail(f"has split {image['split']!r}, not one of {sorted(KARPATHY_SPLITS)}")
    if not isinstance(image["sentences"], list):
        fail("has 'sentences' that is not a list")
    for sentence in image["sentences"]:
        tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            fail("has a sentence without a 'tokens' list of strings")


def image_path(dataset, image_folder, image):
    """COCO images live at image_folder/filepath/filename, all others at image_folder/filename."""
    if dataset == "coco":
        return os.path.join(image_folder, image["filepath"], image["filename"])
    return os.path.join(image_folder, image["filename"])


def split_images(karpathy_images, dataset, image_folder, max_len):
    """{split: [KarpathyImage]}: restval joins train; sentences over max_len tokens are dropped and
    images left with no sentence are skipped, as in the course."""
    splits = {split: [] for split in SPLITS}
    for image in karpathy_images:
        sentences = [sentence["tokens"] for sentence in image["sentences"]]
        captions = [tokens for tokens in sentences if len(tokens) <= max_len]
        if captions:
            splits[KARPATHY_SPLITS[image["split"]]].append(KarpathyImage(
                path=image_path(dataset, image_folder, image),
                image_id=image.get("cocoid", image["filename"]),
                sentences=sentences, captions=captions))
    return splits


def check_splits_not_empty(splits, karpathy_json_path, reason, fix):
    for split, images in splits.items():
        if not images:
            raise ToolkitError(f"split {split} of {karpathy_json_path!r} has no images {reason}; {fix}")


def check_images_exist(splits, dataset, image_folder):
    """Fail before any heavy work when listed images are missing from the image folder."""
    missing = [image.path for images in splits.values() for image in images if not os.path.isfile(image.path)]
    if missing:
        layout = "IMAGE_FOLDER/filepath/filename" if dataset == "coco" else "IMAGE_FOLDER/filename"
        raise ToolkitError(f"{len(missing)} image(s) listed in the split file are missing, e.g. "
                           f"{', '.join(missing[:MAX_LISTED_FILES])}; --dataset {dataset} expects each image "
                           f"at {layout} with IMAGE_FOLDER = {image_folder!r}: point --image-folder there")


def check_no_previous_outputs(paths, overwrite):
    existing = [path for path in paths.values() if os.path.exists(path)]
    if existing and not overwrite:
        raise ToolkitError(f"{existing[0]!r} already exists (files of an earlier run with the same base "
                           f"name); pass --overwrite (overwrite=True) to replace them or choose another "
                           f"--output-folder")


# ---------------------------------------------------------------- captions

def build_word_map(train_images, min_word_freq):
    """Words seen more than min_word_freq times in the train split's kept sentences, ids 1.. in
    first-seen order, then <unk>, <start>, <end>; <pad> is 0."""
    word_freq = collections.Counter()
    for image in train_images:
        for tokens in image.captions:
            word_freq.update(tokens)
    words = [word for word, count in word_freq.items() if count > min_word_freq]
    word_map = {word: index + 1 for index, word in enumerate(words)}
    for token in SPECIAL_TOKENS:
        word_map[token] = len(word_map) + 1
    word_map["<pad>"] = 0
    return word_map


def sample_captions(captions, captions_per_image, rng):
    """Exactly captions_per_image captions: all of them plus draws with replacement when too few,
    a sample without replacement when enough."""
    if len(captions) < captions_per_image:
        return captions + rng.choices(captions, k=captions_per_image - len(captions))
    return rng.sample(captions, k=captions_per_image)


def encode_caption(tokens, word_map, max_len):
    """[<start>] + word ids (<unk> for unknown words) + [<end>] + <pad> up to max_len + 2 ids."""
    unknown = word_map["<unk>"]
    return ([word_map["<start>"]] + [word_map.get(word, unknown) for word in tokens] + [word_map["<end>"]]
            + [word_map["<pad>"]] * (max_len - len(tokens)))


# ---------------------------------------------------------------- images

def to_rgb(image):
    """Any Pillow mode as RGB; 16- and 32-bit grey is scaled from 0..65535 instead of clipped."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": 16-bit PNG/TIFF
        grey = (np.clip(np.asarray(image), 0, 65535) >> 8).astype(np.uint8)
        image = Image.fromarray(grey)
    return image.convert("RGB")


def decode_image(path, size):
    """(uint8 array (3, size, size), None), or (None, why the file cannot be decoded)."""
    try:
        with Image.open(path) as image:
            image.draft(None, (size, size))  # JPEG: DCT-scale by 1/2..1/8 while both sides stay >= size
            resized = to_rgb(image).resize((size, size), RESAMPLE)  # squashed to a square, as the course
    except Exception as error:  # Pillow raises many types (OSError, SyntaxError, ValueError...) for bad files
        return None, f"{type(error).__name__}: {error}"
    return np.asarray(resized).transpose(2, 0, 1), None  # (S, S, 3) -> (3, S, S)


_worker_slots = None  # in a pool worker: the shared pixel buffer (2 * block size, 3, S, S)


def keep_freed_memory():
    """Let glibc reuse freed decode buffers (about 1 MB for a 640 x 480 JPEG) instead of mapping and
    unmapping fresh pages for every image: a new process starts with a 128 kB mmap threshold, and its
    decoding measured 1.5 x slower than the same decoding in a long-lived process. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, WORKER_TRIM_THRESHOLD)
    except (OSError, AttributeError):  # another C library: keep its defaults
        pass


def attach_slots(shared_buffer, image_size):
    """Pool initializer: view the shared buffer as image slots; Ctrl-C is left to the parent."""
    global _worker_slots
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    _worker_slots = np.frombuffer(shared_buffer, dtype=np.uint8).reshape(-1, 3, image_size, image_size)


def decode_into_slot(task):
    """Pool worker: decode image `path` into shared slot `slot`; return None, or why it cannot be decoded."""
    path, slot = task
    pixels, error = decode_image(path, _worker_slots.shape[-1])
    if pixels is not None:
        _worker_slots[slot] = pixels
    return error


def decode_images(images, image_size, workers):
    """Yield (image, pixels (3, S, S) uint8 or None, error) in order, decoded in `workers` processes.

    Pixels come back through shared memory, not pickled through a pipe (measured: ~0.5 ms of the
    parent's CPU per 256 px image, against ~4 ms to decode a 640 x 480 JPEG, on 2 cores that is
    most of the lost speedup): blocks of images alternate between two halves of a shared buffer.
    The next block is queued as soon as its half is free, so the workers never wait for each other
    at the end of a block; the caller stores one block while the workers decode the next. A yielded
    array is valid until the next one is requested.
    """
    if workers == 1:
        for image in images:
            yield image, *decode_image(image.path, image_size)
        return
    context = multiprocessing.get_context("forkserver")  # safe when the parent has imported torch
    # the fork server imports this module once (when the working directory can import it), so the
    # workers of later pools in this process fork from it ready to go instead of importing it again
    context.set_forkserver_preload([__name__])
    block_size = BLOCK_IMAGES_PER_WORKER * workers
    shared_buffer = context.RawArray("B", 2 * block_size * 3 * image_size * image_size)  # 25 MB for 2 x 256 px
    slots = np.frombuffer(shared_buffer, dtype=np.uint8).reshape(2, block_size, 3, image_size, image_size)
    blocks = [images[start:start + block_size] for start in range(0, len(images), block_size)]
    with context.Pool(workers, initializer=attach_slots, initargs=(shared_buffer, image_size)) as pool:
        def queue(number):
            """Start decoding block `number` into its half of the buffer; None past the last block."""
            if number == len(blocks):
                return None
            tasks = [(image.path, number % 2 * block_size + offset) for offset, image in enumerate(blocks[number])]
            return pool.map_async(decode_into_slot, tasks, chunksize=IMAGES_PER_TASK)

        decoding = queue(0)
        for number, block in enumerate(blocks):
            # the caller is done with block number - 1: its half takes block number + 1
            queued = queue(number + 1)
            errors = decoding.get()
            for offset, (image, error) in enumerate(zip(block, errors)):
                yield image, None if error else slots[number % 2, offset], error
            decoding = queued


def write_split_images(split, decoded, images, image_size, captions_per_image, h5_path, skip_bad_images):
    """Store one split's decoded images in order; return the images kept (bad ones skipped)."""
    kept = []
    with h5py.File(h5_path, "w") as h5:
        h5.attrs["captions_per_image"] = captions_per_image
        # chunk = one image, so reading one stays one read; resizable because bad images may be skipped
        stored = h5.create_dataset("images", shape=(len(images), 3, image_size, image_size),
                                   maxshape=(None, 3, image_size, image_size),
                                   chunks=(1, 3, image_size, image_size), dtype="uint8", track_times=False)
        for image, pixels, error in tqdm(decoded, total=len(images), desc=f"{split} images", unit="img"):
            if pixels is None:
                report_bad_image(image.path, error, skip_bad_images)
                continue
            # one image is one chunk: write it as is, bypassing h5py's selection and chunk-cache copies
            # (several times cheaper, and this loop is the serial part that limits the workers' speedup)
            stored.id.write_direct_chunk((len(kept), 0, 0, 0), np.ascontiguousarray(pixels))
            kept.append(image)
        stored.resize(len(kept), axis=0)
    return kept


def report_bad_image(path, error, skip_bad_images):
    if not skip_bad_images:
        raise ToolkitError(f"image {path!r} cannot be decoded ({error}); replace or delete the file, "
                           f"or pass --skip-bad-images to leave out every bad image")
    warnings.warn(f"skipping image {path!r}: cannot be decoded ({error})", stacklevel=2)


# ---------------------------------------------------------------- writing

def write_json(path, value):
    with open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps(value))  # json.dumps uses the C encoder; json.dump does not


def write_split_captions(images, word_map, captions_per_image, max_len, rng, split_paths):
    """Write the CAPTIONS, CAPLENS and REFS files of one split; image i owns captions i*cpi..i*cpi+cpi-1."""
    encoded, lengths = [], []
    for image in images:
        for tokens in sample_captions(image.captions, captions_per_image, rng):
            encoded.append(encode_caption(tokens, word_map, max_len))
            lengths.append(len(tokens) + 2)
    references = [{"image_id": image.image_id, "references": image.sentences} for image in images]
    write_json(split_paths["CAPTIONS"], encoded)
    write_json(split_paths["CAPLENS"], lengths)
    write_json(split_paths["REFS"], references)


def check_options(dataset, captions_per_image, min_word_freq, max_len, image_size, workers):
    if dataset not in DATASETS:
        raise ToolkitError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    for name, value, smallest in (("captions_per_image", captions_per_image, 1), ("min_word_freq", min_word_freq, 0),
                                  ("max_len", max_len, 1), ("image_size", image_size, 1)):
        if not isinstance(value, int) or value < smallest:
            raise ToolkitError(f"{name} must be an integer >= {smallest}, got {value!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ToolkitError(f"workers must be a positive integer or None (all cores), got {workers!r}")


def create_input_files(dataset, karpathy_json_path, image_folder, captions_per_image, min_word_freq,
                       output_folder, max_len=50, image_size=256, workers=None, skip_bad_images=False,
                       overwrite=False):
    """Write the HDF5/JSON files of the course (plus REFS) for a Karpathy split; return a summary dict
    {"data_name", "images": {split: n}, "captions", "vocab_size", "bytes_written", "skipped"}."""
    check_options(dataset, captions_per_image, min_word_freq, max_len, image_size, workers)
    workers = workers or os.cpu_count()
    splits = split_images(load_karpathy_json(karpathy_json_path, dataset), dataset, image_folder, max_len)
    check_splits_not_empty(splits, karpathy_json_path, f"with a sentence of at most max_len={max_len} tokens",
                           "check the file's 'split' values (train, restval, val, test) or raise --max-len")
    check_images_exist(splits, dataset, image_folder)
    base = base_name(dataset, captions_per_image, min_word_freq)
    paths = output_paths(output_folder, base)
    check_no_previous_outputs(paths, overwrite)

    with contextlib.ExitStack() as outputs:  # every file under a temporary name until all succeeded
        tmp = {key: outputs.enter_context(atomic_path(path)) for key, path in paths.items()}
        all_images = [image for split in SPLITS for image in splits[split]]
        with contextlib.closing(decode_images(all_images, image_size, workers)) as decoded:
            kept = {split: write_split_images(split, itertools.islice(decoded, len(splits[split])), splits[split],
                                              image_size, captions_per_image, tmp[split, "IMAGES"], skip_bad_images)
                    for split in SPLITS}
        check_splits_not_empty(kept, karpathy_json_path, "left after skipping bad images",
                               "replace the bad images listed in the warnings")
        word_map = build_word_map(kept["TRAIN"], min_word_freq)
        write_json(tmp["WORDMAP"], word_map)
        rng = random.Random(CAPTION_SEED)
        for split in SPLITS:
            write_split_captions(kept[split], word_map, captions_per_image, max_len, rng,
                                 {kind: tmp[split, kind] for kind in ("CAPTIONS", "CAPLENS", "REFS")})
    images_per_split = {split: len(images) for split, images in kept.items()}
    return {"data_name": base, "images": images_per_split,
            "captions": sum(images_per_split.values()) * captions_per_image, "vocab_size": len(word_map),
            "bytes_written": sum(os.path.getsize(path) for path in paths.values()),
            "skipped": len(all_images) - sum(images_per_split.values())}


# ---------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--karpathy-json", help="Karpathy split file, e.g. dataset_coco.json (not for shapes)")
    parser.add_argument("--image-folder", help="COCO: folder holding train2014/ and val2014/ (not for shapes)")
    parser.add_argument("--output-folder", required=True)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--min-word-freq", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=50, help="longer sentences are dropped")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="image decoding processes (default: all cores)")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip undecodable images with a warning")
    parser.add_argument("--overwrite", action="store_true", help="replace files of an earlier run")
    shapes = parser.add_argument_group("shapes dataset (--dataset shapes)")
    shapes.add_argument("--shapes-train", type=int, default=2000)
    shapes.add_argument("--shapes-val", type=int, default=200)
    shapes.add_argument("--shapes-test", type=int, default=200)
    shapes.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dataset == "shapes" and (args.karpathy_json or args.image_folder):
        parser.error("--dataset shapes makes its own images and split file: drop --karpathy-json/--image-folder")
    if args.dataset != "shapes" and not (args.karpathy_json and args.image_folder):
        parser.error(f"--dataset {args.dataset} needs --karpathy-json and --image-folder")
    return args


def make_shapes_inputs(args):
    """Generate the shapes images and split file; return (karpathy_json_path, image_folder)."""
    import shapes  # only this command needs the generator; image workers import this module too
    json_path = shapes.make_shapes_dataset(args.output_folder, args.shapes_train, args.shapes_val,
                                           args.shapes_test, args.seed, image_size=args.image_size)
    return json_path, os.path.join(args.output_folder, "shapes_images")


def main(argv=None):
    args = parse_args(argv)
    if args.dataset == "shapes":  # refuse existing outputs before spending time on the images
        check_no_previous_outputs(output_paths(args.output_folder, base_name(
            args.dataset, args.captions_per_image, args.min_word_freq)), args.overwrite)
        karpathy_json, image_folder = make_shapes_inputs(args)
    else:
        karpathy_json, image_folder = args.karpathy_json, args.image_folder
    summary = create_input_files(args.dataset, karpathy_json, image_folder, args.captions_per_image,
                                 args.min_word_freq, args.output_folder, max_len=args.max_len,
                                 image_size=args.image_size, workers=args.workers,
                                 skip_bad_images=args.skip_bad_images, overwrite=args.overwrite)
    counts = ", ".join(f"{split} {count}" for split, count in summary["images"].items())
    skipped = f", {summary['skipped']} bad images skipped" if summary["skipped"] else ""
    print(f"{sum(summary['images'].values())} images ({counts}), {summary['captions']} captions, "
          f"vocabulary {summary['vocab_size']} words, {summary['bytes_written'] / 1e6:.1f} MB written to "
          f"{args.output_folder} as {summary['data_name']}{skipped}")


if __name__ == "__main__":
    run_cli(main)
