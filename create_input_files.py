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
import dataclasses
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import warnings

from tqdm import tqdm

from data_files import SPLITS, base_name, new_hdf5_file, output_paths
from images import BadImageError, load_image
from utils import (ToolkitError, atomic_path, check_free_space, check_writable_folder, remove_stale_temp_files,
                   run_cli)

DATASETS = ("coco", "flickr8k", "flickr30k", "shapes")
KARPATHY_SPLITS = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}
SPECIAL_TOKENS = ("<unk>", "<start>", "<end>")  # ids after the words; "<pad>" is 0
RESERVED_TOKENS = SPECIAL_TOKENS + ("<pad>",)  # never words: in a sentence they are encoded as <unk>
CAPTION_SEED = 123  # the course's seed(123) for caption sampling
MAX_LISTED_FILES = 5  # how many missing/bad files an error message names
IMAGES_PER_CHUNK = 8  # images per message to a decoding worker (one image per message costs the parent more)
CHUNKS_AHEAD = 2  # chunks a worker holds, so it never waits for the parent between chunks
RECEIVED_AHEAD = 4  # chunks per worker decoded or queued beyond the one the parent stores next
OUTPUT_FOLDER_OPTION = "--output-folder (output_folder)"
CAPTION_JSON_BYTES_PER_ID = 4  # an upper estimate of one encoded word id in the CAPTIONS file ("12, ")


@dataclasses.dataclass
class KarpathyImage:
    """One image of the split file: where it is, its id, and its sentences as token lists."""
    path: str
    image_id: int | str  # cocoid where the JSON has one, else the file name
    sentences: list  # every original sentence, for the REFS file
    captions: list  # the sentences of at most max_len tokens, to sample from
    objects: list | None = None  # [{"words": [...], "box": [x0, y0, x1, y1]}, ...] where the JSON has them


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
    if "objects" in image and not all(is_object(entry) for entry in listed(image["objects"])):
        fail("has 'objects' that is not a list of {\"words\": [strings], \"box\": [x0, y0, x1, y1] in 0..1}")


def listed(value):
    """`value` if it is a list, else a list holding something no check accepts."""
    return value if isinstance(value, list) else [None]


def is_object(entry):
    """An object record of the split file: its words and its box in fractions of the image side."""
    if not isinstance(entry, dict) or not isinstance(entry.get("words"), list) or not isinstance(entry.get("box"), list):
        return False
    box = entry["box"]
    return (all(isinstance(word, str) for word in entry["words"]) and len(box) == 4
            and all(isinstance(value, (int, float)) and 0 <= value <= 1 for value in box))


def image_path(dataset, image_folder, image):
    """COCO images live at image_folder/filepath/filename, all others at image_folder/filename."""
    if dataset == "coco":
        return os.path.join(image_folder, image["filepath"], image["filename"])
    return os.path.join(image_folder, image["filename"])


def split_images(karpathy_images, dataset, image_folder, max_len):
    """{split: [KarpathyImage]}: restval joins train; sentences over max_len tokens are dropped and
    images left with no sentence are skipped, as in the course, with a warning that names them."""
    splits = {split: [] for split in SPLITS}
    without_sentences, only_long_sentences = [], []
    for image in karpathy_images:
        sentences = [sentence["tokens"] for sentence in image["sentences"]]
        captions = [tokens for tokens in sentences if len(tokens) <= max_len]
        if not sentences:
            without_sentences.append(image["filename"])
        elif not captions:
            only_long_sentences.append(image["filename"])
        else:
            splits[KARPATHY_SPLITS[image["split"]]].append(KarpathyImage(
                path=image_path(dataset, image_folder, image),
                image_id=image.get("cocoid", image["filename"]),
                sentences=sentences, captions=captions, objects=image.get("objects")))
    warn_left_out(without_sentences, "have an empty 'sentences' list")
    warn_left_out(only_long_sentences, f"have no sentence of at most max_len={max_len} tokens (raise --max-len "
                                       f"to keep them)")
    return splits


def warn_left_out(filenames, reason):
    if filenames:
        warnings.warn(f"{len(filenames)} image(s) of the split file {reason} and are left out: "
                      f"{', '.join(filenames[:MAX_LISTED_FILES])}{', ...' if len(filenames) > MAX_LISTED_FILES else ''}",
                      stacklevel=3)


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
    first-seen order, then <unk>, <start>, <end>; <pad> is 0. A reserved token in a sentence is no word."""
    word_freq = collections.Counter()
    for image in train_images:
        for tokens in image.captions:
            word_freq.update(tokens)
    words = [word for word, count in word_freq.items() if count > min_word_freq and word not in RESERVED_TOKENS]
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
    """[<start>] + word ids (<unk> for unknown words and reserved tokens) + [<end>] + <pad> up to max_len + 2 ids."""
    unknown = word_map["<unk>"]
    word_ids = [unknown if word in RESERVED_TOKENS else word_map.get(word, unknown) for word in tokens]
    return [word_map["<start>"]] + word_ids + [word_map["<end>"]] + [word_map["<pad>"]] * (max_len - len(tokens))


# ---------------------------------------------------------------- images

def decode_image(path, size):
    """(uint8 array (3, size, size), None), or (None, why the file cannot be decoded)."""
    try:
        return load_image(path, size), None
    except BadImageError as error:
        return None, error.reason


def decode_chunks(connection, image_size):
    """A decoding worker: decode each list of paths the parent sends, send back its list of
    decode_image results. It leaves Ctrl-C and SIGTERM to the parent, and ends quietly when the
    parent closes the pipe or is gone (killed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with connection:
        while True:
            try:
                paths = connection.recv()
                connection.send([decode_image(path, image_size) for path in paths])
            except (EOFError, BrokenPipeError, ConnectionResetError):
                return


def decode_images(images, image_size, workers):
    """Yield (image, pixels (3, S, S) uint8 or None, error) in order, decoded in `workers` processes.

    Chunks of IMAGES_PER_CHUNK images go to whichever worker has fewer than CHUNKS_AHEAD of them,
    results are taken from whichever worker has them ready (a worker never waits with a finished
    chunk for its turn) and yielded in chunk order: the same order, so the same bytes, as one worker.
    At most RECEIVED_AHEAD chunks per worker are sent ahead of the one yielded next, bounding memory.
    """
    if workers == 1:
        for image in images:
            yield image, *decode_image(image.path, image_size)
        return
    chunks = [images[start:start + IMAGES_PER_CHUNK] for start in range(0, len(images), IMAGES_PER_CHUNK)]
    context = multiprocessing.get_context("forkserver")  # safe when the parent has imported torch
    context.set_forkserver_preload([__name__])  # the workers fork from a server that imported this module
    pipes = [context.Pipe() for _ in range(workers)]
    processes = [context.Process(target=decode_chunks, args=(child, image_size), daemon=True) for _, child in pipes]
    connections = [parent for parent, _ in pipes]
    sent = [collections.deque() for _ in range(workers)]  # per worker: numbers of the chunks it holds, oldest first
    received = {}  # chunk number -> its results, until yielded
    next_to_send = 0

    def top_up(next_to_yield):
        """Give every worker holding fewer than CHUNKS_AHEAD chunks the next ones, within the memory bound."""
        nonlocal next_to_send
        last = min(len(chunks), next_to_yield + RECEIVED_AHEAD * workers)
        for worker, connection in enumerate(connections):
            while len(sent[worker]) < CHUNKS_AHEAD and next_to_send < last:
                connection.send([image.path for image in chunks[next_to_send]])
                sent[worker].append(next_to_send)
                next_to_send += 1

    def receive(next_to_yield, timeout):
        """Take the results of every worker that has some ready, waiting up to `timeout` s (None: until one has)."""
        for connection in multiprocessing.connection.wait(connections, timeout):
            received[sent[connections.index(connection)].popleft()] = connection.recv()
        top_up(next_to_yield)

    try:
        for process, (_, child) in zip(processes, pipes):
            process.start()
            child.close()
        top_up(0)
        for number, chunk in enumerate(chunks):
            receive(number, timeout=0)
            while number not in received:
                receive(number, timeout=None)
            for image, (pixels, error) in zip(chunk, received.pop(number)):
                yield image, pixels, error
    except (EOFError, BrokenPipeError, ConnectionResetError):  # a worker is gone: killed, out of memory...
        exit_codes = [process.exitcode for process in processes if not process.is_alive()]
        raise ToolkitError(f"an image decoding worker process ended unexpectedly (exit codes {exit_codes}); if the "
                           f"machine ran out of memory, pass fewer --workers (--workers 1 decodes in the main "
                           f"process)") from None
    finally:  # done, failed or interrupted: the workers have nothing left to finish
        for connection in connections:
            connection.close()
        for process in processes:
            if process.pid is not None:
                process.kill()
                process.join()


def write_split_images(split, decoded, images, image_size, captions_per_image, h5_path, skip_bad_images):
    """Store one split's decoded images in order; return the images kept (bad ones skipped)."""
    kept = []
    with new_hdf5_file(h5_path) as h5:
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
            stored.id.write_direct_chunk((len(kept), 0, 0, 0), pixels)  # load_image gives C-contiguous pixels
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


def split_caption_files(images, word_map, captions_per_image, max_len, rng):
    """{"CAPTIONS", "CAPLENS", "REFS"}: the JSON values of one split; image i owns captions i*cpi..i*cpi+cpi-1,
    and its REFS entry carries its "objects" when the split file has them."""
    encoded, lengths = [], []
    for image in images:
        for tokens in sample_captions(image.captions, captions_per_image, rng):
            encoded.append(encode_caption(tokens, word_map, max_len))
            lengths.append(len(tokens) + 2)
    references = [reference_entry(image) for image in images]
    return {"CAPTIONS": encoded, "CAPLENS": lengths, "REFS": references}


def reference_entry(image):
    entry = {"image_id": image.image_id, "references": image.sentences}
    if image.objects is not None:
        entry["objects"] = image.objects
    return entry


def needed_bytes(image_count, image_size, captions_per_image, max_len, karpathy_json_path):
    """An upper estimate of the bytes written: the images, the encoded captions, and REFS plus the word map
    (smaller than the split file they come from)."""
    images = image_count * 3 * image_size * image_size
    captions = image_count * captions_per_image * (max_len + 2) * CAPTION_JSON_BYTES_PER_ID
    return images + captions + os.path.getsize(karpathy_json_path)


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
    check_writable_folder(output_folder, OUTPUT_FOLDER_OPTION)
    remove_stale_temp_files(output_folder)
    workers = workers or os.cpu_count()
    splits = split_images(load_karpathy_json(karpathy_json_path, dataset), dataset, image_folder, max_len)
    check_splits_not_empty(splits, karpathy_json_path, f"with a sentence of at most max_len={max_len} tokens",
                           "check the file's 'split' values (train, restval, val, test) or raise --max-len")
    check_images_exist(splits, dataset, image_folder)
    base = base_name(dataset, captions_per_image, min_word_freq)
    paths = output_paths(output_folder, base)
    check_no_previous_outputs(paths, overwrite)
    all_images = [image for split in SPLITS for image in splits[split]]
    check_free_space(output_folder, needed_bytes(len(all_images), image_size, captions_per_image, max_len,
                                                 karpathy_json_path), f"the {len(all_images)} images and captions")

    with contextlib.ExitStack() as outputs:  # every file under a temporary name until all succeeded
        def staged(key, size=None):
            """A temporary path for output `key`, renamed with the others once all are written. Each file is
            staged just before it is written, so a full disk is reported for the file being written."""
            return outputs.enter_context(atomic_path(paths[key], needed_bytes=size))

        with contextlib.closing(decode_images(all_images, image_size, workers)) as decoded:
            kept = {split: write_split_images(split, itertools.islice(decoded, len(splits[split])), splits[split],
                                              image_size, captions_per_image,
                                              staged((split, "IMAGES"), len(splits[split]) * 3 * image_size ** 2),
                                              skip_bad_images)
                    for split in SPLITS}
        check_splits_not_empty(kept, karpathy_json_path, "left after skipping bad images",
                               "replace the bad images listed in the warnings")
        word_map = build_word_map(kept["TRAIN"], min_word_freq)
        write_json(staged("WORDMAP"), word_map)
        rng = random.Random(CAPTION_SEED)
        for split in SPLITS:
            for kind, value in split_caption_files(kept[split], word_map, captions_per_image, max_len, rng).items():
                write_json(staged((split, kind)), value)
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
    if args.dataset == "shapes":  # refuse a bad output folder or existing outputs before making the images
        check_writable_folder(args.output_folder, OUTPUT_FOLDER_OPTION)
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
