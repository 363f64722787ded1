"""Beam search for every decoder: batched (many images at once) and the course's one image at a time.

Both follow the course's algorithm: k beams per image, the first step expands only the first beam,
a beam that emits <end> is complete and the image keeps searching with one beam fewer, and the
result is the complete caption with the highest total log-probability (the earliest on a tie).
When no beam completes within max_steps, the best running beam is returned. The one-image search
is kept as the reference the batched search is tested against: they give the same captions.

Three options change the search (both searches take them and stay equal):
- length_penalty (alpha, default 0): the complete captions of an image are ranked by GNMT's normalised
  score, total log-probability / ((5 + length) / 6) ** alpha, length counting every generated word with
  <end> (not <start>), as self-critical.pytorch's `length_wu`. As there, it applies only where complete
  captions are compared, at the end: the beams are still chosen by their total log-probability at each
  step. With 0 the ranking is by total log-probability, as the course's.
- block_trigrams (default False): a beam may not write a trigram it has already written; the words that
  would repeat one get a log-probability of -inf before the beams' candidates are ranked.
- n_best (default 1, at most beam_size): each image's n_best captions, best first: its complete captions by
  ranking score (the earliest on a tie), then, when fewer than n_best completed within max_steps, its best
  running beams.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import select_rows
from utils import ToolkitError


@dataclass
class Caption:
    """A decoded caption: word ids from <start> to <end>, and per generated word its attention."""

    words: list
    score: float  # total log-probability
    alphas: torch.Tensor = None  # (T, P) attention over the P regions for each of the T generated words
    betas: torch.Tensor = None  # (T,) sentinel weight of the adaptive decoder
    ranking_score: float = None  # the score it is ranked by: `score` length-normalised with length_penalty


def check_search_options(beam_size, length_penalty, block_trigrams, n_best):
    """Refuse a length_penalty, block_trigrams or n_best the search cannot use (their options: --length-penalty,
    --block-trigrams, --n-best)."""
    if (not isinstance(length_penalty, (int, float)) or isinstance(length_penalty, bool)
            or not math.isfinite(length_penalty) or length_penalty < 0):
        raise ToolkitError(f"length_penalty = {length_penalty!r} must be a number of at least 0 (--length-penalty; "
                           f"0 ranks the captions by their total log-probability)")
    if not isinstance(block_trigrams, bool):
        raise ToolkitError(f"block_trigrams = {block_trigrams!r} must be True or False (--block-trigrams)")
    if not isinstance(n_best, int) or isinstance(n_best, bool) or not 1 <= n_best <= beam_size:
        raise ToolkitError(f"n_best = {n_best!r} must be a whole number from 1 to beam_size ({beam_size}) "
                           f"(--n-best)")


def ranking_score(score, length, length_penalty):
    """GNMT's length-normalised score of a caption of `length` generated words (with <end>)."""
    return score / ((5 + length) / 6) ** length_penalty


def make_caption(decoder, words, score, attention, length_penalty):
    """A Caption of word ids (T + 1,), its total log-probability and ranking score; the decoder's attention trail
    (T, P) or (T, P + 1) is split into alphas and betas."""
    words = words.tolist()
    caption = Caption(words, score, ranking_score=ranking_score(score, len(words) - 1, length_penalty))
    if attention is not None:
        attention = attention.cpu()
        caption.alphas, caption.betas = (attention[:, :-1], attention[:, -1]) if decoder.has_sentinel else (
            attention, None)
    return caption


def best_captions(decoder, complete, running, n_best, length_penalty):
    """The n_best Captions of one image from its (words, score, attention) complete captions in the order they
    completed and its running beams in score order: the complete ones by ranking score (sorted is stable: the
    earliest first on a tie), then running beams when fewer than n_best completed."""
    ranked = sorted(complete, key=lambda found: -ranking_score(found[1], len(found[0]) - 1, length_penalty))
    return [make_caption(decoder, words, score, attention, length_penalty)
            for words, score, attention in (ranked + running)[:n_best]]


def flat_grid(encoder_out):
    """Encodings (B, G, G, C) or (B, P, C) -> (B, P, C); an ensemble's tuple of them, one per model -> a tuple."""
    if isinstance(encoder_out, tuple):
        return tuple(flat_grid(encodings) for encodings in encoder_out)
    return encoder_out.reshape(encoder_out.size(0), -1, encoder_out.size(-1))


def expand_start(decoder, encoder_out, beams):
    """Start the decoder on the flat_grid encodings; return each image's memory once and its state `beams` times."""
    memory, state = decoder.start(flat_grid(encoder_out))
    rows = state[0]  # (B, ...): every decoder's state has a row per image
    index = torch.arange(rows.size(0), device=rows.device).repeat_interleave(beams)
    return memory, select_rows(state, index)


def step_log_probs(decoder, words, memory, state):
    """Feed the previous words (N,); return log-probabilities (N, V), the new state, attention."""
    preds, state, attention = decoder.one_step(decoder.embedding(words), memory, state)
    return F.log_softmax(preds, dim=1), state, attention


def live_step_log_probs(decoder, words, state, live):
    """step_log_probs of a decoder that reads no memory (its step is its state and the word), computed for the
    `live` rows only: the others (masked slots) keep their state and get log-probabilities of 0, which their
    score of -inf turns into candidates of -inf. Returns (N, V) log-probabilities and the (N, ...) state."""
    log_probs, live_state, _ = step_log_probs(decoder, words[live], (), select_rows(state, live))
    full = log_probs.new_zeros(words.size(0), log_probs.size(1)).index_copy_(0, live, log_probs)  # (N, V)
    return full, tuple(rows.index_copy(0, live, new) for rows, new in zip(state, live_state))


def repeated_trigram_words(words):
    """The words that would repeat a trigram of `words` (a list of ids) if written next."""
    trigrams = set(zip(words, words[1:], words[2:]))
    return {third for first, second, third in trigrams if (first, second) == tuple(words[-2:])}


@torch.inference_mode()
def beam_search_one(decoder, encoder_out, start_id, end_id, beam_size=3, max_steps=50, length_penalty=0.0,
                    block_trigrams=False, n_best=1):
    """The course's beam search for one image: encoder_out (1, G, G, C) or (1, P, C) (an Ensemble's: a tuple of them,
    one per model) -> Caption, or with n_best > 1 a list of n_best Captions, best first (the options: the module's
    docstring)."""
    check_search_options(beam_size, length_penalty, block_trigrams, n_best)
    k = beam_size
    memory, state = expand_start(decoder, encoder_out, k)
    device = state[0].device
    prev_words = torch.full((k,), start_id, dtype=torch.long, device=device)
    seqs = prev_words.unsqueeze(1)  # (k, 1)
    top_k_scores = torch.zeros(k, device=device)
    trail = None  # (k, t, P) attention of each beam so far
    complete = []  # (words, score, attention) in completion order
    for step in range(1, max_steps + 1):
        log_probs, state, attention = step_log_probs(decoder, prev_words, memory, state)
        if block_trigrams:
            for beam, words in enumerate(seqs.tolist()):
                for word in repeated_trigram_words(words):
                    log_probs[beam, word] = float("-inf")
        vocab_size = log_probs.size(1)
        scores = top_k_scores.unsqueeze(1) + log_probs  # (k, V)
        candidates = scores[0] if step == 1 else scores.reshape(-1)
        top_k_scores, top_k_words = candidates.topk(k)
        prev_beam, next_word = top_k_words // vocab_size, top_k_words % vocab_size
        seqs = torch.cat([seqs[prev_beam], next_word.unsqueeze(1)], dim=1)
        if attention is not None:
            new = attention[prev_beam].unsqueeze(1)
            trail = new if trail is None else torch.cat([trail[prev_beam], new], dim=1)
        finished = next_word == end_id
        for i in finished.nonzero().flatten().tolist():
            complete.append((seqs[i], top_k_scores[i].item(), None if trail is None else trail[i]))
        k -= len(finished.nonzero())
        if k == 0:
            break
        running = (~finished).nonzero().flatten()
        seqs, top_k_scores, prev_words = seqs[running], top_k_scores[running], next_word[running]
        trail = None if trail is None else trail[running]
        state = select_rows(state, prev_beam[running])  # memory: the image's one row, for any number of beams
    running = [(seqs[i], top_k_scores[i].item(), None if trail is None else trail[i]) for i in range(k)]  # sorted
    captions = best_captions(decoder, complete, running, n_best, length_penalty)
    return captions[0] if n_best == 1 else captions


@torch.inference_mode()
def beam_search(decoder, encoder_out, start_id, end_id, beam_size=3, max_steps=50, length_penalty=0.0,
                block_trigrams=False, n_best=1):
    """Batched beam search: encoder_out (B, G, G, C) or (B, P, C) (an Ensemble's: a tuple of them, one per model) ->
    list of B Captions, or with n_best > 1 of B lists of n_best Captions, best first (the options: the module's
    docstring).

    Every image searching has k rows of the batch, image after image (its k consecutive state rows share its
    memory row): its running beams first, in score order, then masked slots, whose score is -inf so that they
    never give a candidate (at the first step all but the first beam are masked, as the course expands only
    the first). A beam that completes masks its slot; an image whose search ended leaves the batch. For a
    decoder whose step reads no memory (Show and Tell) the step computes only the running beams' rows: its
    step is a few matrix products over every row, and the masked slots are a fifth of them.
    """
    check_search_options(beam_size, length_penalty, block_trigrams, n_best)
    k = beam_size
    memory, state = expand_start(decoder, encoder_out, k)  # k state rows per image
    device = state[0].device
    batch = state[0].size(0) // k
    prev_words = torch.full((batch * k,), start_id, dtype=torch.long, device=device)  # (B k,)
    seqs = prev_words.unsqueeze(1)  # (B k, t)
    rank = torch.arange(k, device=device)
    beams_left = torch.full((batch,), k, dtype=torch.long, device=device)
    row_scores = torch.zeros(batch, k, device=device).masked_fill(rank > 0, float("-inf"))  # (B, k)
    trail = None  # (B k, t, P)
    image_ids = torch.arange(batch, device=device)  # original index of each image still searching
    complete = [[] for _ in range(batch)]  # per image, its complete (words, score, attention) in completion order
    unfinished = [[] for _ in range(batch)]  # per image, its running beams when max_steps ends the search
    compute_live_rows_only = memory == ()
    for step in range(1, max_steps + 1):
        if compute_live_rows_only:
            live = torch.isfinite(row_scores).flatten().nonzero().flatten()  # (N',) rows of running beams
            (log_probs, state), attention = live_step_log_probs(decoder, prev_words, state, live), None
        else:
            log_probs, state, attention = step_log_probs(decoder, prev_words, memory, state)
        if block_trigrams:
            log_probs = block_repeated_trigrams(log_probs, seqs)
        images, vocab_size = beams_left.size(0), log_probs.size(1)
        # Each image's candidates: its beams' scores plus each next word, -inf from its masked slots.
        scores = row_scores.view(-1, 1) + log_probs  # (B k, V)
        top_scores, top_index = scores.view(images, -1).topk(k, dim=1)  # (B, k), sorted
        next_word = top_index % vocab_size
        source = top_index // vocab_size + k * torch.arange(images, device=device).unsqueeze(1)  # (B, k) rows
        seqs = torch.cat([seqs[source], next_word.unsqueeze(2)], dim=2)  # (B, k, t + 1)
        if attention is not None:
            trail = attention[source].unsqueeze(2) if trail is None else torch.cat(
                [trail[source], attention[source].unsqueeze(2)], dim=2)  # (B, k, t + 1, P)
        # As in the one-image search, an image with b beams left takes only its b best candidates.
        taken = rank.unsqueeze(0) < beams_left.unsqueeze(1)
        finished = taken & (next_word == end_id)
        record_beams(complete, finished, top_scores, seqs, trail, image_ids)
        beams_left = beams_left - finished.sum(dim=1)
        running = taken & ~finished  # (B, k)
        if step == max_steps or not running.any():
            record_beams(unfinished, running, top_scores, seqs, trail, image_ids)
            break
        searching = beams_left > 0
        if not searching.all():  # drop images whose search ended: the others keep k rows each
            keep = searching.nonzero().flatten()
            memory, beams_left, image_ids = select_rows(memory, keep), beams_left[keep], image_ids[keep]
            running, source, next_word, top_scores, seqs = select_rows((running, source, next_word, top_scores,
                                                                        seqs), keep)
            trail = None if trail is None else trail[keep]
        # the running beams first, in score order (a stable sort), then the masked slots
        order = (~running).to(torch.uint8).argsort(dim=1, stable=True)  # (B', k)
        image = torch.arange(order.size(0), device=device).unsqueeze(1)  # (B', 1)
        state = select_rows(state, source.gather(1, order).flatten())
        prev_words, seqs = next_word.gather(1, order).flatten(), seqs[image, order].flatten(0, 1)
        row_scores = top_scores.gather(1, order).masked_fill(rank >= beams_left.unsqueeze(1), float("-inf"))
        trail = None if trail is None else trail[image, order].flatten(0, 1)
    captions = [best_captions(decoder, complete[i], unfinished[i], n_best, length_penalty) for i in range(batch)]
    return [found[0] for found in captions] if n_best == 1 else captions


def block_repeated_trigrams(log_probs, seqs):
    """Log-probabilities (N, V) with -inf for each row's words that would repeat a trigram of its words (N, t)."""
    if seqs.size(1) < 3:
        return log_probs
    # position j of a row is a match when its words j, j + 1 are the row's last two: word j + 2 would repeat
    match = (seqs[:, :-2] == seqs[:, -2:-1]) & (seqs[:, 1:-1] == seqs[:, -1:])  # (N, t - 2)
    repeats = torch.zeros_like(log_probs).scatter_add_(1, seqs[:, 2:], match.to(log_probs.dtype))  # (N, V)
    return log_probs.masked_fill(repeats > 0, float("-inf"))


def record_beams(into, chosen, scores, seqs, trail, image_ids):
    """Append each image's chosen beams (B, k) to into[image] as (words, score, attention), in beam order."""
    rows, beams = chosen.nonzero().unbind(1)
    images = image_ids[rows].tolist()
    for image, row, beam, score in zip(images, rows.tolist(), beams.tolist(), scores[rows, beams].tolist()):
        into[image].append((seqs[row, beam], score, None if trail is None else trail[row, beam]))
