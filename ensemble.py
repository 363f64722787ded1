"""Ensembles: the decoders of several trained models searching as one decoder.

At every step each model scores the next word from its own encodings and state, and the ensemble's word scores are
the mean of the models' log-probabilities, (1/M) sum_m log_softmax(scores_m). The log_softmax the searches apply to
a decoder's scores then normalises them: the ensemble's distribution is the models' normalised geometric mean, and
a caption's score its total log-probability under it. (self-critical.pytorch's AttEnsemble averages the
probabilities instead, the arithmetic mean: it differs where the models disagree.)
"""
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from utils import ToolkitError


class Ensemble(nn.Module):
    """Decoders of one word map presenting the interface the searches use: start, embedding, one_step,
    has_attention and has_sentinel. Its memory and state are the models' tuples laid end to end, so that the
    searches select their rows as they do a single decoder's. The attention it reports is the first model's, over
    the first model's grid (has_attention and has_sentinel are the first model's): where the first model looked
    while the ensemble chose the word."""

    def __init__(self, decoders):
        super().__init__()
        self.decoders = nn.ModuleList(decoders)
        self.has_attention, self.has_sentinel = decoders[0].has_attention, decoders[0].has_sentinel
        self.memory_sizes = self.state_sizes = None  # per model, how many tensors its memory and state hold (start)

    def start(self, encoder_out):
        """A tuple of per-model encodings (B, P_m, C_m) -> (memory, state): every model's laid end to end."""
        started = [decoder.start(encodings) for decoder, encodings in zip(self.decoders, encoder_out, strict=True)]
        self.memory_sizes = [len(memory) for memory, _ in started]
        self.state_sizes = [len(state) for _, state in started]
        return join_tuples(memory for memory, _ in started), join_tuples(state for _, state in started)

    def embedding(self, words):
        """(N,) word ids -> per model its embeddings (N, E_m), a tuple."""
        return tuple(decoder.embedding(words) for decoder in self.decoders)

    def one_step(self, embeddings, memory, state):
        """One step of every model -> the mean of their log-probabilities (N, V), the new state laid end to end, and
        the first model's attention (N, P_1) or (N, P_1 + 1), or None."""
        steps = [decoder.one_step(embedded, own_memory, own_state) for decoder, embedded, own_memory, own_state in
                 zip(self.decoders, embeddings, split_tuple(memory, self.memory_sizes),
                     split_tuple(state, self.state_sizes))]
        log_probs = torch.stack([F.log_softmax(scores, dim=1) for scores, _, _ in steps])  # (M, N, V)
        return log_probs.mean(dim=0), join_tuples(own_state for _, own_state, _ in steps), steps[0][2]


def join_tuples(tuples):
    """The models' tuples laid end to end, one tuple."""
    return tuple(itertools.chain.from_iterable(tuples))


def split_tuple(tensors, sizes):
    """A tuple laid end to end -> its consecutive parts of sizes[0], sizes[1]... tensors."""
    ends = list(itertools.accumulate(sizes))
    return [tensors[end - size:end] for size, end in zip(sizes, ends)]


def check_word_maps(paths, word_maps):
    """Refuse an ensemble of checkpoints whose word maps differ, naming the first file and the one that differs: the
    ensemble averages its models' log-probabilities word by word."""
    first = word_maps[0]
    for path, word_map in zip(paths[1:], word_maps[1:]):
        if word_map != first:
            moved = sum(word_map.get(word) != index for word, index in first.items())
            raise ToolkitError(f"checkpoints {paths[0]!r} and {path!r} have different word maps ({len(first)} and "
                               f"{len(word_map)} words; {moved} words of the first are missing from the second or "
                               f"have another index): an ensemble averages its models' log-probabilities word by word. "
                               f"Ensemble checkpoints trained on the same data (the same WORDMAP_<data_name>.json)")
