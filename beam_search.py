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

from models import select_rows


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


def step_log_probs(decoder, words, memory, state):
    """Feed the previous words (N,); return log-probabilities (N, V), the new state, attention."""
    preds, state, attention = decoder.one_step(decoder.embedding(words), memory, state)
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

    Every image searching has k rows of the batch, image after image (its k consecutive state rows share its
    memory row): its running beams first, in score order, then masked slots, whose score is -inf so that they
    never give a candidate (at the first step all but the first beam are masked, as the course expands only
    the first). A beam that completes masks its slot; an image whose search ended leaves the batch.
    """
    k, device = beam_size, encoder_out.device
    memory, state = expand_start(decoder, encoder_out, k)  # k state rows per image
    batch = state[0].size(0) // k
    prev_words = torch.full((batch * k,), start_id, dtype=torch.long, device=device)  # (B k,)
    seqs = prev_words.unsqueeze(1)  # (B k, t)
    rank = torch.arange(k, device=device)
    beams_left = torch.full((batch,), k, dtype=torch.long, device=device)
    row_scores = torch.zeros(batch, k, device=device).masked_fill(rank > 0, float("-inf"))  # (B, k)
    trail = None  # (B k, t, P)
    image_ids = torch.arange(batch, device=device)  # original index of each image still searching
    best = [None] * batch  # (score, words, attention) of the best complete caption per image
    for step in range(1, max_steps + 1):
        log_probs, state, attention = step_log_probs(decoder, prev_words, memory, state)
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
        record_completions(best, finished, top_scores, seqs, trail, image_ids)
        beams_left = beams_left - finished.sum(dim=1)
        running = taken & ~finished  # (B, k)
        if step == max_steps or not running.any():
            record_unfinished(best, top_scores.masked_fill(~running, float("-inf")), seqs, trail, image_ids)
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
