"""CLIP-S as a reward of self-critical training (Cho et al., NAACL 2022, "Fine-grained Image Captioning with CLIP
Reward"): how well each sampled caption fits its TRAIN image, by the CLIP model of clip_score.py.

    reward = CiderClipReward(CiderD(train_references), ClipReward.from_split(scorer, folder, name, word_map), 1.0)
    rewards = reward.scores(candidates, image_indices)  # (C,) float64: CIDEr-D + 1.0 x CLIP-S

The TRAIN images are embedded once, when the reward is built; a step embeds only its captions' texts.
"""
import torch
from tqdm.auto import tqdm

from clip_score import clip_s
from data_files import data_paths
from datasets import opened_images_file
from vocabulary import SPECIAL_WORDS

IMAGE_BATCH = 128  # images embedded a call when the reward is built


class ClipReward:
    """CLIP-S = 2.5 max(cos(image, caption), 0) of id-sequence captions with their images, whose unit CLIP
    embeddings are computed once."""

    def __init__(self, scorer, images, word_map, quiet=False):
        """scorer: a clip_score.ClipScorer; images: uint8 (N, 3, S, S), anything sliced into batches (an h5py
        dataset, a tensor); word_map: {word: id}; quiet: no progress bar (ranks other than 0)."""
        self.scorer = scorer
        self.words = {index: word for word, index in word_map.items() if word not in SPECIAL_WORDS}
        starts = range(0, len(images), IMAGE_BATCH)
        batches = (torch.as_tensor(images[start:start + IMAGE_BATCH]) for start in starts)  # each (B, 3, S, S)
        self.image_embeddings = scorer.batch_embeddings(
            tqdm(batches, total=len(starts), desc="CLIP reward: embedding the images", unit="batch", disable=quiet))
        # (N, D), on the scorer's device

    @classmethod
    def from_split(cls, scorer, data_folder, data_name, word_map, split="TRAIN", quiet=False):
        """The reward of the captions of `split`'s images, read from its HDF5 images file in order."""
        path = data_paths(data_folder, data_name, split)["images"]
        with opened_images_file(path, data_folder, data_name) as images:
            return cls(scorer, images, word_map, quiet)

    def text(self, candidate):
        """Word ids (a list or 1-D tensor) -> the words joined by spaces (no <start>, <end> or <pad>)."""
        return " ".join(self.words[index] for index in map(int, candidate) if index in self.words)

    def scores(self, candidates, image_indices):
        """CLIP-S (C,) float64 of each candidate (an id sequence) with its image (C indices into the images)."""
        with torch.autocast(self.scorer.device.type, enabled=False):  # float32 whatever the training's autocast
            captions = self.scorer.text_embeddings([self.text(candidate) for candidate in candidates])  # (C, D)
        images = self.image_embeddings[torch.as_tensor(image_indices, device=self.scorer.device)]  # (C, D)
        return clip_s(images, captions).double().cpu().numpy()


class CiderClipReward:
    """The reward of scst_reward "cider+clips": CIDEr-D + weight x CLIP-S of each candidate."""

    def __init__(self, cider, clip, weight):
        self.cider, self.clip, self.weight = cider, clip, weight  # a cider.CiderD, a ClipReward, a float

    def scores(self, candidates, image_indices):
        """(C,) float64 rewards of candidates (id sequences) with their images' indices, as CiderD.scores."""
        return self.cider.scores(candidates, image_indices) + self.weight * self.clip.scores(candidates, image_indices)
