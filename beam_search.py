"""Beam search for every decoder: batched (many images at once) and the course's one image at a time.

Both follow the course's algorithm: k beams per image, the first step expands only the first beam,
a beam that emits <end> is complete and the image keeps searching with one beam fewer, and the
result is the complete caption with the highest total log-probability (the earliest on a tie).
When no beam completes within max_steps, the best running beam is returned. The one-image search
is kept as the reference the batched search is tested against: they give the same captions.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models import RowLayout, select_rows


@dataclass
class Caption:
    """A decoded caption: word ids from <start> to <end>, and per generated word its attention."""

    words: list
    score: float  # total log-probability
    alphas: torch.Tensor = None  # (T, P) attention over the P regions for each of the T generated words
    betas: torch.Tensor = None  # (T,) sentinel weight of the adaptive decoder


def make_caption(decoder, words, score, attention):
    """Split the attention trail (T, P) or (T, P + 1) of a decoder into alphas and betas."""
    if attention is None:
        return Caption(words, score)
    if decoder.has_sentinel:
        return Caption(words, score, attention[:, :-1], attention[:, -1])
    return Caption(words, score, attention)


def expand_start(decoder, encoder_out, beams):
    """Flatten (B, G, G, C) encodings; return each image's memory once and its state `beams` times."""
    encoder_out = encoder_out.reshape(encoder_out.size(0), -1, encoder_out.size(-1))  # (B, P, C)
    memory, state = decoder.start(encoder_out)
    index = torch.arange(encoder_out.size(0), device=encoder_out.device).repeat_interleave(beams)
    return memory, select_rows(state, index)


def step_log_probs(decoder, words, memory, state, layout=None):
    """Feed the previous words (N,); return log-probabilities (N, V), the new state, attention.

    A decoder that does not handle a RowLayout gets a copy of its image's memory row for each state row."""
    if layout is not None and not decoder.handles_layout:
        memory, layout = select_rows(memory, layout.image), None
    preds, state, attention = decoder.one_step(decoder.embedding(words), memory, state, layout)
    return F.log_softmax(preds, dim=1), state, attention


@torch.inference_mode()
def beam_search_one(decoder, encoder_out, start_id, end_id, beam_size=3, max_steps=50):
    """The course's beam search for one image: encoder_out (1, G, G, C) or (1, P, C) -> Caption."""
    k = beam_size
    memory, state = expand_start(decoder, encoder_out, k)
    prev_words = torch.full((k,), start_id, dtype=torch.long, device=encoder_out.device)
    seqs = prev_words.unsqueeze(1)  # (k, 1)
    top_k_scores = torch.zeros(k, device=encoder_out.device)
    trail = None  # (k, t, P) attention of each beam so far
    complete = []  # (words, score, attention) in completion order
    for step in range(1, max_steps + 1):
        log_probs, state, attention = step_log_probs(decoder, prev_words, memory, state)
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
    if not complete:  # nothing reached <end>: the best running beam (they are sorted)
        complete = [(seqs[0], top_k_scores[0].item(), None if trail is None else trail[0])]
    scores = [score for _, score, _ in complete]
    words, score, attention = complete[scores.index(max(scores))]
    return make_caption(decoder, words.tolist(), score, None if attention is None else attention.cpu())


@torch.inference_mode()
def beam_search(decoder, encoder_out, start_id, end_id, beam_size=3, max_steps=50):
    """Batched beam search: encoder_out (B, G, G, C) or (B, P, C) -> list of B Captions.

    The running beams of all images are the rows of one batch, image after image, each image's in
    score order (a RowLayout tells the decoder which image each row reads). A beam that completes
    leaves the batch, and so does an image whose search ended: no step computes a dead beam.
    """
    k, device = beam_size, encoder_out.device
    encoder_out = encoder_out.reshape(encoder_out.size(0), -1, encoder_out.size(-1))  # (B, P, C)
    memory, state = decoder.start(encoder_out)  # one row per image: its first beam
    batch = encoder_out.size(0)
    layout = RowLayout(torch.arange(batch, device=device), torch.zeros(batch, dtype=torch.long, device=device), 1)
    prev_words = torch.full((batch,), start_id, dtype=torch.long, device=device)  # (N,) one per running beam
    seqs = prev_words.unsqueeze(1)  # (N, t)
    row_scores = torch.zeros(batch, device=device)  # (N,)
    trail = None  # (N, t, P)
    beams_left = torch.full((batch,), k, dtype=torch.long, device=device)
    rank = torch.arange(k, device=device)
    image_ids = torch.arange(batch, device=device)  # original index of each image still searching
    best = [None] * batch  # (score, words, attention) of the best complete caption per image
    for step in range(1, max_steps + 1):
        log_probs, state, attention = step_log_probs(decoder, prev_words, memory, state, layout)
        images, vocab_size = beams_left.size(0), log_probs.size(1)
        # Each image's candidates: its beams' scores plus each next word, -inf in its empty slots.
        scores = layout.pad(row_scores.unsqueeze(1) + log_probs, images, float("-inf"))  # (B * width, V)
        top_scores, top_index = scores.view(images, -1).topk(k, dim=1)  # (B, k), sorted
        next_word = top_index % vocab_size
        rows = layout.pad(torch.arange(len(prev_words), device=device), images).view(images, -1)  # (B, width)
        source = rows.gather(1, top_index // vocab_size)  # (B, k): the row each candidate extends
        seqs = torch.cat([seqs[source], next_word.unsqueeze(2)], dim=2)  # (B, k, t + 1)
        if attention is not None:
            trail = attention[source].unsqueeze(2) if trail is None else torch.cat(
                [trail[source], attention[source].unsqueeze(2)], dim=2)  # (B, k, t + 1, P)
        # As in the one-image search, an image with b beams left takes only its b best candidates.
        taken = rank.unsqueeze(0) < beams_left.unsqueeze(1)
        finished = taken & (next_word == end_id)
        record_completions(best, finished, top_scores, seqs, trail, image_ids)
        beams_left = beams_left - finished.sum(dim=1)
        running = taken & ~finished  # (B, k)
        if step == max_steps or not running.any():
            record_unfinished(best, top_scores.masked_fill(~running, float("-inf")), seqs, trail, image_ids)
            break
        searching = beams_left > 0
        new_image = searching.cumsum(0) - 1  # index of each image among those still searching
        image, beam = running.nonzero(as_tuple=True)  # the new rows, image after image, in score order
        layout = RowLayout(new_image[image], (running.cumsum(1) - 1)[image, beam], int(beams_left.max()))
        state = select_rows(state, source[image, beam])
        prev_words, seqs, row_scores = next_word[image, beam], seqs[image, beam], top_scores[image, beam]
        trail = None if trail is None else trail[image, beam]
        if not searching.all():  # drop images whose search ended
            keep = searching.nonzero().flatten()
            memory, beams_left, image_ids = select_rows(memory, keep), beams_left[keep], image_ids[keep]
    return [make_caption(decoder, words.tolist(), score, None if attention is None else attention.cpu())
            for score, words, attention in best]


def record_completions(best, finished, scores, seqs, trail, image_ids):
    """Keep, per image, the complete caption with the highest score (earliest wins a tie)."""
    masked = scores.masked_fill(~finished, float("-inf"))
    step_best_score, step_best_beam = masked.max(dim=1)  # max returns the first maximal beam
    for row in finished.any(dim=1).nonzero().flatten().tolist():
        image, beam, score = image_ids[row].item(), step_best_beam[row].item(), step_best_score[row].item()
        if best[image] is None or score > best[image][0]:
            best[image] = (score, seqs[row, beam], None if trail is None else trail[row, beam])


def record_unfinished(best, beam_scores, seqs, trail, image_ids):
    """Images with no complete caption after max_steps take their best running beam."""
    for row, image in enumerate(image_ids.tolist()):
        if best[image] is None:
            beam = beam_scores[row].argmax().item()
            best[image] = (beam_scores[row, beam].item(), seqs[row, beam],
                           None if trail is None else trail[row, beam])
