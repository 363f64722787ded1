"""PyTorch datasets over the files of create_input_files.py, and the helpers that check and read them
(data_files.py names them)."""
import contextlib
import json
import os
import typing

import h5py
import torch
from torch.utils.data import Dataset

from data_files import SPLITS, check_split, creation_command, data_paths, wordmap_path
from images import normalize_images
from utils import ToolkitError
from vocabulary import SPECIAL_WORDS, WORD_MAP_TOKENS


# ---------------------------------------------------------------- files

def check_data_files(data_folder, data_name, splits=SPLITS):
    """Raise a ToolkitError naming the first missing file (word map, images, captions, caplens) and the
    command that creates it. A missing REFS file is fine: folders made by the course's code lack it."""
    required = [wordmap_path(data_folder, data_name)]
    for split in splits:
        paths = data_paths(data_folder, data_name, split)
        required += [paths["images"], paths["captions"], paths["caplens"]]
    for path in required:
        if not os.path.isfile(path):
            raise ToolkitError(f"data file {path!r} does not exist; create it with "
                               f"`{creation_command(data_folder, data_name)}`, or fix data_folder/data_name")


def read_json(path, data_folder, data_name):
    """Load one JSON data file, with a ToolkitError that says how to recreate it."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise ToolkitError(f"data file {path!r} does not exist; create it with "
                           f"`{creation_command(data_folder, data_name)}`") from None
    except (OSError, ValueError) as error:  # ValueError covers JSONDecodeError and bad UTF-8
        raise ToolkitError(f"data file {path!r} cannot be read ({error}); recreate it with "
                           f"`{creation_command(data_folder, data_name)} --overwrite`") from None


@contextlib.contextmanager
def opened_images_file(path, data_folder, data_name):
    """Yield the h5py dataset `images` of an IMAGES file, open for reading; a missing, truncated or foreign
    file (or one without that dataset) is a ToolkitError naming it and the command that recreates it."""
    try:
        with h5py.File(path, "r") as h5:
            yield h5["images"]
    except FileNotFoundError:
        raise ToolkitError(f"data file {path!r} does not exist; create it with "
                           f"`{creation_command(data_folder, data_name)}`") from None
    except (OSError, KeyError) as error:
        raise ToolkitError(f"{path!r} is not an images file of create_input_files.py, or it is truncated "
                           f"({error}); recreate it with `{creation_command(data_folder, data_name)} "
                           f"--overwrite`") from None


def read_images_header(path, data_folder, data_name):
    """(captions_per_image, number of images) of an IMAGES HDF5 file."""
    with opened_images_file(path, data_folder, data_name) as images:
        return int(images.file.attrs["captions_per_image"]), len(images)


def load_word_map(data_folder, data_name):
    """{word: id} of WORDMAP_<data_name>.json, refused unless it is an object holding every special token."""
    path = wordmap_path(data_folder, data_name)
    word_map = read_json(path, data_folder, data_name)
    fix = f"recreate it with `{creation_command(data_folder, data_name)} --overwrite`"
    if not isinstance(word_map, dict):
        raise ToolkitError(f"word map {path!r} holds a JSON {type(word_map).__name__}, not an object "
                           f"{{word: id}}; {fix}")
    missing = [token for token in WORD_MAP_TOKENS if token not in word_map]
    if missing:
        raise ToolkitError(f"word map {path!r} lacks the special token(s) {', '.join(missing)}; {fix}")
    not_ids = [word for word, index in word_map.items() if not isinstance(index, int) or isinstance(index, bool)]
    if not_ids:
        raise ToolkitError(f"word map {path!r} maps {not_ids[0]!r} to {word_map[not_ids[0]]!r}, not an integer "
                           f"id; {fix}")
    return word_map


class References(typing.NamedTuple):
    """Per image of a split, in HDF5 order: its id, its reference sentences as token lists, and its objects."""
    image_ids: list  # cocoid or file name; the HDF5 index when `fallback`
    references: list  # [[tokens, ...], ...]
    fallback: bool  # True: no REFS file (course-made folder), references decoded from the sampled captions
    objects: list  # per image [{"words": [...], "box": [x0, y0, x1, y1]}, ...], or None where the data has none


def load_references(data_folder, data_name, split, word_map):
    """The REFS file of a split; where it is missing, the split's encoded captions decoded with word_map
    (<unk> stays a token) and the HDF5 index as image id, flagged `fallback`."""
    paths = data_paths(data_folder, data_name, split)
    if os.path.isfile(paths["refs"]):
        entries = read_json(paths["refs"], data_folder, data_name)
        return References([entry["image_id"] for entry in entries], [entry["references"] for entry in entries],
                          fallback=False, objects=[entry.get("objects") for entry in entries])
    captions_per_image, _ = read_images_header(paths["images"], data_folder, data_name)
    words = {index: word for word, index in word_map.items()}
    captions = [[words[index] for index in caption if words[index] not in SPECIAL_WORDS]
                for caption in read_json(paths["captions"], data_folder, data_name)]
    references = [captions[start:start + captions_per_image] for start in range(0, len(captions), captions_per_image)]
    return References(list(range(len(references))), references, fallback=True, objects=[None] * len(references))


# ---------------------------------------------------------------- datasets

class SplitData(Dataset):
    """One split's captions and lengths, read once, and its HDF5 images, opened lazily in each process
    (an h5py handle must not cross a fork or be pickled), so DataLoader workers can each read."""

    def __init__(self, data_folder, data_name, split):
        self.split = check_split(split)
        self.paths = data_paths(data_folder, data_name, split)
        check_data_files(data_folder, data_name, [split])
        self.captions_per_image, self.num_images = read_images_header(self.paths["images"], data_folder, data_name)
        self.captions = self.read_tensor(data_folder, data_name, "captions")  # (N * cpi, max_len + 2)
        self.caplens = self.read_tensor(data_folder, data_name, "caplens")  # (N * cpi,)
        self._h5_files = {}  # path -> open h5py.File, only in the process that opened it
        self._h5_pid = None

    def read_tensor(self, data_folder, data_name, kind):
        values = read_json(self.paths[kind], data_folder, data_name)
        if len(values) != self.num_images * self.captions_per_image:
            raise ToolkitError(f"{self.paths[kind]!r} holds {len(values)} entries but {self.paths['images']!r} "
                               f"has {self.num_images} images x {self.captions_per_image} captions; the files "
                               f"come from different runs: recreate them with "
                               f"`{creation_command(data_folder, data_name)} --overwrite`")
        return torch.tensor(values, dtype=torch.long)

    def h5_dataset(self, path, name):
        """The h5py dataset `name` of `path`, opened on first use in this process."""
        if self._h5_pid != os.getpid():  # a forked worker must not reuse its parent's handles
            self._h5_files, self._h5_pid = {}, os.getpid()
        if path not in self._h5_files:
            self._h5_files[path] = h5py.File(path, "r")
        return self._h5_files[path][name]

    def image(self, index):
        """uint8 tensor (3, S, S) of image `index`."""
        return torch.from_numpy(self.h5_dataset(self.paths["images"], "images")[index])

    def __getstate__(self):
        return dict(self.__dict__, _h5_files={}, _h5_pid=None)


class CaptionDataset(SplitData):
    """The course's dataset: one item per caption. TRAIN items are (image, caption, caplen); VAL and
    TEST items add all_captions (cpi, max_len + 2) of that image. The image is float (3, S, S) scaled to
    [0, 1], then `transform` if given, else normalised with ImageNet's mean and std."""

    def __init__(self, data_folder, data_name, split, transform=None):
        super().__init__(data_folder, data_name, split)
        self.transform = transform

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, index):
        image_index = index // self.captions_per_image
        if self.transform is None:
            image = normalize_images(self.image(image_index))
        else:
            image = self.transform(self.image(image_index).float() / 255.)
        # clones: a view would carry the whole split's storage through a DataLoader worker's queue
        caption = self.captions[index].clone()  # (max_len + 2,)
        caplen = self.caplens[index:index + 1].clone()  # (1,)
        if self.split == "TRAIN":
            return image, caption, caplen
        first = image_index * self.captions_per_image
        return image, caption, caplen, self.captions[first:first + self.captions_per_image].clone()


class ImageCaptionsDataset(SplitData):
    """One item per image: (uint8 image (3, S, S), captions (cpi, max_len + 2), caplens (cpi,)).
    Images are not normalised (the trainer does it on its device with normalize_images). With
    `features_file` (HDF5 dataset `features`, float16 (N, P, C)) the first element is that image's
    float16 features (P, C) instead."""

    def __init__(self, data_folder, data_name, split, features_file=None):
        super().__init__(data_folder, data_name, split)
        self.features_file = features_file
        if features_file is not None:
            self.check_features_file()
        self.captions = self.captions.view(self.num_images, self.captions_per_image, -1)  # (N, cpi, L)
        self.caplens = self.caplens.view(self.num_images, self.captions_per_image)  # (N, cpi)

    def check_features_file(self):
        try:
            with h5py.File(self.features_file, "r") as h5:
                shape = h5["features"].shape
        except (OSError, KeyError) as error:
            raise ToolkitError(f"features file {self.features_file!r} cannot be read ({error}); delete it "
                               f"and let the feature cache rebuild it") from None
        if len(shape) != 3 or shape[0] != self.num_images:
            raise ToolkitError(f"features file {self.features_file!r} holds features of shape {shape}, not "
                               f"({self.num_images}, P, C) for {self.paths['images']!r}; delete it and let "
                               f"the feature cache rebuild it")

    def __len__(self):
        return self.num_images

    def __getitem__(self, index):
        if self.features_file is None:
            inputs = self.image(index)  # uint8 (3, S, S)
        else:
            inputs = torch.from_numpy(self.h5_dataset(self.features_file, "features")[index])  # float16 (P, C)
        return inputs, self.captions[index].clone(), self.caplens[index].clone()  # (cpi, L), (cpi,)
