"""CIDEr-D as the reward of self-critical training, on word ids.

The definition is coco-caption's (pycocoevalcap/cider/cider_scorer.py, which is CIDEr-D): n-grams of
orders 1 to 4, each weighted tf x idf with idf = log(documents) - log(max(1, df)), a cosine per order
between the candidate and each reference in which the candidate's weights are clipped to the reference's,
a Gaussian length penalty exp(-delta^2 / (2 sigma^2)) with sigma 6, the mean over orders, the mean over
the references, times 10. As in coco-caption, a sentence's length for the penalty is its number of
bigrams (words - 1, and 0 for a single word).

Unlike coco-caption, the document frequencies come once from a fixed corpus (the TRAIN split's
references), not from the set being scored: a reward must not change with the batch it is computed in.
The corpus images are registered once: their reference vectors are precomputed, so a batch scored by
image index only counts the candidates' n-grams.

Every computation is vectorised with numpy over the whole batch: an n-gram is an int64 code (its
word ids + 1 as digits in base vocab_size + 1), and a set of sentences is a sparse table of
(sentence, n-gram code, weight) entries.
"""
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from utils import ToolkitError

NGRAM_ORDER = 4
SIGMA = 6.0
INT64_MAX = np.iinfo(np.int64).max
COUNT_CHUNK = 2 ** 16  # sentences whose n-grams are counted at a time: bounds the padded (S, L) id arrays


@dataclass
class NgramVectors:
    """Sparse n-gram vectors of S sentences: entry k says n-gram `codes[k]` (of order index `orders[k]`,
    0 for unigrams) has weight `weights[k]` in sentence `rows[k]`; entries are sorted by row, then code."""
    rows: np.ndarray  # (E,) int64
    codes: np.ndarray  # (E,) int64
    orders: np.ndarray  # (E,) int8
    weights: np.ndarray  # (E,) float64: the term frequency, then tf x idf once weighed
    lengths: np.ndarray  # (S,) int64: the length of the length penalty (number of bigrams)
    norms: np.ndarray = None  # (S, n) float64: the Euclidean norm of each order's tf-idf vector


@dataclass
class ReferenceSet:
    """The tf-idf vectors of the references of I images: image i's references are the sentences
    first_sentence[i] to first_sentence[i + 1] - 1 of `vectors`, and its entries first_entry[i] to
    first_entry[i + 1] - 1."""
    vectors: NgramVectors
    first_sentence: np.ndarray  # (I + 1,) int64
    first_entry: np.ndarray  # (I + 1,) int64


def padded_ids(sequences):
    """Id sequences (lists, arrays or 1-D tensors of ints) -> ids (S, L) int64 padded with 0, lengths (S,)."""
    arrays = [sequence.detach().cpu().numpy().reshape(-1) if isinstance(sequence, torch.Tensor)
              else np.asarray(sequence, dtype=np.int64).reshape(-1) for sequence in sequences]
    lengths = np.array([len(array) for array in arrays], dtype=np.int64)
    ids = np.zeros((len(arrays), max(lengths, default=0)), dtype=np.int64)
    for row, array in enumerate(arrays):
        ids[row, :len(array)] = array
    return ids, lengths


def is_image_indices(references):
    """Whether `references` holds image indices (an array, a tensor or a list of ints), not references."""
    return (isinstance(references, (np.ndarray, torch.Tensor))
            or isinstance(references[0], numbers.Integral)
            or isinstance(references[0], torch.Tensor) and references[0].dim() == 0)


def concatenated_ranges(starts, stops):
    """The integers of the ranges [starts[k], stops[k]) one after the other (M,), and the range k each one
    comes from (M,)."""
    sizes = stops - starts
    owner = np.repeat(np.arange(len(starts)), sizes)
    offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return starts[owner] + offsets, owner


def sorted_runs(rows, codes):
    """Sort (row, code) pairs by row, then code, and merge equal pairs: their rows, codes and counts."""
    distinct, rank = np.unique(codes, return_inverse=True)  # codes renumbered 0..U-1: (row, rank) fits int64
    keys, counts = np.unique(rows * len(distinct) + rank, return_counts=True)
    return keys // len(distinct), distinct[keys % len(distinct)], counts


class CiderD:
    """CIDEr-D with the document frequencies of `corpus`, whose images are registered for fast scoring.

    corpus: a list over images of lists of reference id sequences (no <start>, <end> or <pad>), e.g. the
        TRAIN split's references.
    vocab_size: the number of word ids (len(word_map)); by default the largest id in the corpus + 1.

        reward = CiderD(train_references, vocab_size=len(word_map))
        rewards = reward.scores(candidates, image_indices)  # by index into the corpus: fast
        rewards = reward.scores(candidates, references)     # against any references (e.g. val's)
    """

    def __init__(self, corpus, vocab_size=None, n=NGRAM_ORDER, sigma=SIGMA):
        if len(corpus) == 0:
            raise ValueError("CiderD needs a corpus of at least one image's references")
        self.n, self.sigma = n, sigma
        sentences = [sentence for references in corpus for sentence in references]
        if vocab_size is None:
            vocab_size = 1 + max((int(max(sentence)) for sentence in sentences if len(sentence)), default=0)
        self.vocab_size = vocab_size
        self.base = vocab_size + 1  # digits: id + 1, so that no n-gram's code starts with a zero digit
        if self.base ** n > INT64_MAX:
            raise ToolkitError(f"a vocabulary of {vocab_size:,} words is too large for {n}-gram codes of 64 bits "
                               f"(at most {int(INT64_MAX ** (1 / n)) - 1:,} words): raise min_word_freq")
        self.order_starts = self.base ** np.arange(1, n, dtype=np.int64)  # the smallest code of orders 2..n
        counts, first_sentence = self.reference_counts(corpus)
        self.log_documents = np.log(float(len(corpus)))
        self.df_codes, self.df_counts = self.document_frequencies(counts, first_sentence)
        self.corpus = self.reference_set(counts, first_sentence)

    # ---- n-gram vectors

    def count_ngrams(self, sequences):
        """Id sequences -> their NgramVectors with term frequencies as weights (no norms yet)."""
        parts = [self.count_chunk(sequences[start:start + COUNT_CHUNK], start)
                 for start in range(0, max(len(sequences), 1), COUNT_CHUNK)]
        return NgramVectors(*(np.concatenate(arrays) for arrays in zip(*parts)))

    def count_chunk(self, sequences, first_row):
        """count_ngrams of sequences numbered from first_row: (rows, codes, orders, counts, lengths)."""
        ids, lengths = padded_ids(sequences)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"word ids must lie in [0, {self.vocab_size}); got {ids.min()} .. {ids.max()} "
                             f"(pass CiderD(vocab_size=len(word_map)))")
        rows, codes = [], []
        code = np.zeros_like(ids)
        for order in range(1, self.n + 1):
            # code of the n-gram of this order starting at word i: code of order - 1 at i, then word i + order - 1
            code = code[:, :ids.shape[1] - order + 1] * self.base + ids[:, order - 1:] + 1  # (S, L - order + 1)
            inside = np.arange(code.shape[1]) + order <= lengths[:, None]
            rows.append(np.nonzero(inside)[0])
            codes.append(code[inside])
        rows, codes, counts = sorted_runs(np.concatenate(rows), np.concatenate(codes))
        orders = np.searchsorted(self.order_starts, codes, side="right").astype(np.int8)
        return rows + first_row, codes, orders, counts.astype(np.float64), np.maximum(lengths - 1, 0)

    def reference_counts(self, references):
        """A list over images of lists of id sequences -> their sentences' NgramVectors, first_sentence (I + 1,)."""
        for image, sentences in enumerate(references):
            if len(sentences) == 0:
                raise ValueError(f"image {image} has no reference caption: CIDEr-D needs at least one")
        sizes = np.array([len(sentences) for sentences in references], dtype=np.int64)
        first_sentence = np.concatenate([[0], np.cumsum(sizes)])
        counts = self.count_ngrams([sentence for sentences in references for sentence in sentences])
        return counts, first_sentence

    def document_frequencies(self, counts, first_sentence):
        """The corpus's n-grams held by the references of more than one image, sorted (U,), and how many
        images each (U,). The others need no entry: log(max(1, df)) is 0 for df 1 as for df 0 (most of a
        corpus's 3- and 4-grams: left out, they make the table several times smaller and its search faster)."""
        image_of_sentence = np.repeat(np.arange(len(first_sentence) - 1), np.diff(first_sentence))
        _, codes, _ = sorted_runs(image_of_sentence[counts.rows], counts.codes)  # one entry per (image, n-gram)
        codes, df = np.unique(codes, return_counts=True)
        shared = df > 1
        # A sentinel above every code (the largest is base ** n - 1): a search always lands on an entry.
        return np.append(codes[shared], INT64_MAX), np.append(df[shared], 0)

    def idf(self, codes):
        """log(documents) - log(max(1, df)) of n-gram codes (E,); an n-gram absent from the corpus has df 0."""
        distinct, inverse = np.unique(codes, return_inverse=True)  # sorted queries: a faster search
        position = np.searchsorted(self.df_codes, distinct)
        df = np.where(self.df_codes[position] == distinct, self.df_counts[position], 0)
        return (self.log_documents - np.log(np.maximum(1.0, df)))[inverse]

    def weigh(self, counts):
        """Term frequencies -> tf-idf weights, with the norm of each sentence's vector per order."""
        weights = counts.weights * self.idf(counts.codes)
        squares = np.bincount(counts.rows * self.n + counts.orders, weights ** 2,
                              minlength=len(counts.lengths) * self.n)
        return NgramVectors(counts.rows, counts.codes, counts.orders, weights, counts.lengths,
                            np.sqrt(squares).reshape(-1, self.n))

    def reference_set(self, counts, first_sentence):
        vectors = self.weigh(counts)
        first_entry = np.searchsorted(vectors.rows, first_sentence)
        return ReferenceSet(vectors, first_sentence, first_entry)

    # ---- scoring

    def scores(self, candidates, references):
        """CIDEr-D of each candidate (C,) float64.

        candidates: C id sequences (lists or 1-D tensors, no <start>, <end> or <pad>).
        references: the index of each candidate's image in the corpus (C ints, a list, array or tensor), or
            each candidate's own references (a list of C lists of id sequences).
        """
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} references: one entry each")
        if len(candidates) == 0:
            return np.zeros(0)
        if is_image_indices(references):
            reference_set, images = self.corpus, np.asarray(torch.as_tensor(references).cpu(), dtype=np.int64)
            if images.min() < 0 or images.max() >= len(reference_set.first_sentence) - 1:
                raise ValueError(f"image indices must lie in [0, {len(reference_set.first_sentence) - 1}) "
                                 f"(the corpus's images); got {images.min()} .. {images.max()}")
        else:
            reference_set, images = self.reference_set(*self.reference_counts(references)), np.arange(len(references))
        return self.cider(self.weigh(self.count_ngrams(candidates)), reference_set, images)

    def cider(self, candidate, reference_set, images):
        """CIDEr-D (C,) of candidate vectors against the references of reference_set's `images` (C,)."""
        refs = reference_set.vectors
        # Every (candidate, reference of its image) pair, candidate after candidate: (P,) each.
        pair_sentence, pair_candidate = concatenated_ranges(reference_set.first_sentence[images],
                                                            reference_set.first_sentence[images + 1])
        references_per_candidate = reference_set.first_sentence[images + 1] - reference_set.first_sentence[images]
        first_pair = np.concatenate([[0], np.cumsum(references_per_candidate)])  # (C + 1,)
        dots = self.clipped_dots(candidate, reference_set, images, first_pair)  # (P, n)
        norms = candidate.norms[pair_candidate] * refs.norms[pair_sentence]  # (P, n)
        cosines = np.divide(dots, norms, out=dots.copy(), where=norms != 0)  # coco-caption: 0 / 0 stays 0
        delta = candidate.lengths[pair_candidate] - refs.lengths[pair_sentence]
        penalised = cosines.mean(axis=1) * np.exp(-delta ** 2 / (2 * self.sigma ** 2))  # (P,)
        return 10.0 * np.bincount(pair_candidate, penalised, minlength=len(images)) / references_per_candidate

    def clipped_dots(self, candidate, reference_set, images, first_pair):
        """Per (candidate, reference) pair and order: the sum over shared n-grams of
        min(candidate weight, reference weight) x reference weight (P, n)."""
        refs = reference_set.vectors
        # The reference entries of the candidates' images, each image once; slot = its place in `batch_images`.
        batch_images, candidate_slot = np.unique(images, return_inverse=True)
        ref_entry, ref_slot = concatenated_ranges(reference_set.first_entry[batch_images],
                                                  reference_set.first_entry[batch_images + 1])
        # Match (image, n-gram) keys: n-grams renumbered 0..U-1 within the batch so that keys fit int64.
        entry_candidate = candidate.rows
        _, ranks = np.unique(np.concatenate([candidate.codes, refs.codes[ref_entry]]), return_inverse=True)
        distinct = ranks.max() + 1 if len(ranks) else 1
        candidate_keys = candidate_slot[entry_candidate] * distinct + ranks[:len(candidate.codes)]
        ref_keys = ref_slot * distinct + ranks[len(candidate.codes):]
        by_key = np.argsort(ref_keys, kind="stable")
        sorted_keys = ref_keys[by_key]
        # Every (candidate entry, reference entry) with the same image and n-gram.
        matched, candidate_entry = concatenated_ranges(np.searchsorted(sorted_keys, candidate_keys, side="left"),
                                                       np.searchsorted(sorted_keys, candidate_keys, side="right"))
        ref_entry = ref_entry[by_key[matched]]
        owner = entry_candidate[candidate_entry]
        pair = first_pair[owner] + refs.rows[ref_entry] - reference_set.first_sentence[images[owner]]
        ref_weight = refs.weights[ref_entry]
        products = np.minimum(candidate.weights[candidate_entry], ref_weight) * ref_weight
        order = candidate.orders[candidate_entry]
        dots = np.bincount(pair * self.n + order, products, minlength=first_pair[-1] * self.n)
        return dots.astype(np.float64, copy=False).reshape(-1, self.n)  # float even when nothing matched
