"""Results files of the COCO caption evaluation server: image ids read from COCO's file names, and the JSON
list [{"image_id": int, "caption": str}] the server takes, checked before any captioning and written atomically.

    check_coco_results("captions_val2014_mymodel_results.json", image_paths)  # before captioning
    write_coco_results("captions_val2014_mymodel_results.json", captioner.caption(image_paths))
"""
import json
import os
import re

from utils import ToolkitError, atomic_path

COCO_FILE_NAME = re.compile(r"COCO_(?:train|val|test)2014_(\d+)\.\w+")  # COCO_val2014_000000123456.jpg
RESULTS_FILE_NAME = re.compile(r"captions_(?:val|test)2014_[A-Za-z0-9][\w-]*_results\.json")
RESULTS_FORM = "captions_val2014_<alg>_results.json or captions_test2014_<alg>_results.json"
SHOWN_FILES = 10  # bad files named in one message


def coco_image_id(path):
    """The image id in a COCO file name (COCO_val2014_000000123456.jpg -> 123456); None for any other name."""
    match = COCO_FILE_NAME.fullmatch(os.path.basename(os.fspath(path)))
    return int(match[1]) if match else None


def check_coco_results(results_path, sources):
    """Refuse, before any captioning, a results file name the server does not take, an image whose file name
    holds no COCO id (or that has no file name), and two files of one image."""
    check_results_name(results_path)
    if not sources:
        raise ToolkitError(f"no images to write into {os.fspath(results_path)!r}; pass the COCO image files (or "
                           f"their folder, e.g. val2014/)")
    check_image_ids(sources)


def check_results_name(results_path):
    """The server takes only files named captions_(val2014|test2014)_<alg>_results.json."""
    name = os.path.basename(os.fspath(results_path))
    if not RESULTS_FILE_NAME.fullmatch(name):
        raise ToolkitError(f"COCO results file {name!r} is not named as the evaluation server expects: "
                           f"{RESULTS_FORM} (<alg>: your method's name, letters, digits, _ and -); rename it, "
                           f"e.g. captions_val2014_mymodel_results.json")


def check_image_ids(sources):
    """Every source is a file named like COCO_val2014_000000123456.jpg, and no image id comes twice."""
    paths = [os.fspath(source) if isinstance(source, (str, os.PathLike)) else None for source in sources]
    check_coco_names(paths)
    check_distinct_ids(paths)


def check_coco_names(paths):
    """Refuse the paths (None: an image given in memory) whose file name holds no COCO image id, naming them."""
    unnamed = ["an image given in memory" if path is None else repr(path) for path in paths
               if path is None or coco_image_id(path) is None]
    if unnamed:
        more = f" and {len(unnamed) - SHOWN_FILES} more" if len(unnamed) > SHOWN_FILES else ""
        raise ToolkitError(f"{len(unnamed)} image(s) carry no COCO image id in their file name: "
                           f"{', '.join(unnamed[:SHOWN_FILES])}{more}. COCO results need COCO's own file names, "
                           f"COCO_val2014_<12-digit id>.jpg (or test2014, train2014): caption the files of val2014/ "
                           f"or test2014/ under their original names, or leave --coco-results out")


def check_distinct_ids(paths):
    """Refuse two files of one COCO image (the server takes one caption per image)."""
    first_path = {}
    for path in paths:
        image_id = coco_image_id(path)
        if image_id in first_path:
            raise ToolkitError(f"{first_path[image_id]!r} and {path!r} are both COCO image {image_id}; pass each "
                               f"image once (a file and the folder holding it count twice)")
        first_path[image_id] = path


def coco_results(results):
    """The server's list [{"image_id", "caption"}] of Captioner results; an image that could not be read is a
    ToolkitError (a results file without it would be incomplete)."""
    failed = [result["path"] for result in results if result["caption"] is None]
    if failed:
        raise ToolkitError(f"{len(failed)} image(s) could not be read, so no COCO results file was written: "
                           f"{', '.join(map(repr, failed[:SHOWN_FILES]))}; replace them and caption again")
    return [{"image_id": coco_image_id(result["path"]), "caption": result["caption"]} for result in results]


def write_coco_results(results_path, results):
    """Write the server's JSON list of Captioner results to results_path, atomically."""
    entries = coco_results(results)
    with atomic_path(results_path) as tmp, open(tmp, "w", encoding="utf-8") as file:
        json.dump(entries, file)
