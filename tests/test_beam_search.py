"""Beam search: batched against the one-image reference (with each option too), greedy at k=1, larger beams score
higher, the length penalty, trigram blocking and the n best; an ensemble of decoders, step by step and searched."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from beam_search import beam_search, beam_search_one
from ensemble import Ensemble
from models import DecoderWithAdaptiveAttention, DecoderWithAttention, DecoderWithRNN, DecoderWithTransformer
from utils import ToolkitError

VOCAB, CHANNELS, START, END = 30, 16, 1, 3
DECODERS = {
    "rnn": lambda: DecoderWithRNN(8, 12, VOCAB, CHANNELS, dropout=0.0),
    "attention": lambda: DecoderWithAttention(10, 8, 12, VOCAB, CHANNELS, dropout=0.0),
    "adaptive": lambda: DecoderWithAdaptiveAttention(10, 8, 12, VOCAB, CHANNELS, dropout=0.0),
}


@functools.cache
def trained_decoder(name, seed=0):
    """A decoder briefly trained to map 24 random encodings to captions of 1 to 8 random words, so
    that its captions end after varied numbers of steps and its distributions are not all peaked."""
    torch.manual_seed(seed)
    decoder = DECODERS[name]()
    encoder_out = torch.randn(24, 3, 3, CHANNELS)  # (B, G, G, C)
    lengths = torch.randint(1, 9, (24,))
    captions = torch.zeros(24, 11, dtype=torch.long)  # <start> words <end> <pad>...
    for i, length in enumerate(lengths):
        captions[i, 0], captions[i, length + 1] = START, END
        captions[i, 1:length + 1] = torch.randint(4, VOCAB, (length,))
    return fit(decoder, encoder_out, captions, lengths, steps=100), encoder_out


@functools.cache
def repeating_decoder(seed=0):
    """An attention decoder briefly trained to map 24 random encodings to captions that say three random words
    three times over."""
    torch.manual_seed(seed)
    decoder = DECODERS["attention"]()
    encoder_out = torch.randn(24, 3, 3, CHANNELS)  # (B, G, G, C)
    captions = torch.zeros(24, 11, dtype=torch.long)  # <start> (a b c) x 3 <end>
    captions[:, 0], captions[:, 10] = START, END
    captions[:, 1:10] = torch.randint(4, VOCAB, (24, 3)).repeat(1, 3)
    return fit(decoder, encoder_out, captions, torch.full((24,), 9), steps=250), encoder_out


def fit(decoder, encoder_out, captions, lengths, steps):
    """The decoder trained with Adam for `steps` on encodings (B, G, G, C) and captions (B, T) of `lengths` words
    between <start> and <end>, in eval mode."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(steps):
        scores, sorted_captions, decode_lengths, _, _ = decoder(encoder_out, captions, lengths + 2)
        loss = F.cross_entropy(pack_padded_sequence(scores, decode_lengths, batch_first=True).data,
                               pack_padded_sequence(sorted_captions[:, 1:], decode_lengths, batch_first=True).data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return decoder.eval()


def greedy(decoder, encoder_out, max_steps):
    """Argmax decoding of one image, for comparison with beam size 1."""
    memory, state = decoder.start(encoder_out.reshape(1, -1, CHANNELS))
    words, score = [START], 0.0
    with torch.no_grad():
        while len(words) <= max_steps and words[-1] != END:
            preds, state, _ = decoder.one_step(decoder.embedding(torch.tensor([words[-1]])), memory, state)
            log_probs = F.log_softmax(preds, dim=1)[0]
            words.append(int(log_probs.argmax()))
            score += log_probs.max().item()
    return words, score


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_equals_one_at_a_time(name, beam_size):
    decoder, encoder_out = trained_decoder(name)
    batched = beam_search(decoder, encoder_out, START, END, beam_size, max_steps=14)
    reference = [beam_search_one(decoder, encoder_out[i:i + 1], START, END, beam_size, max_steps=14)
                 for i in range(len(encoder_out))]
    assert [c.words for c in batched] == [c.words for c in reference]
    assert [c.score for c in batched] == pytest.approx([c.score for c in reference], abs=1e-4)
    lengths = {len(c.words) for c in reference}
    assert len(lengths) > 2, "the captions should end at different steps for this test to mean something"
    for got, want in zip(batched, reference):
        assert got.words[0] == START
        if name == "rnn":
            assert got.alphas is None and got.betas is None
        else:
            assert got.alphas.shape == (len(got.words) - 1, 9)
            torch.testing.assert_close(got.alphas, want.alphas, atol=1e-5, rtol=0)
        if name == "adaptive":
            assert got.betas.shape == (len(got.words) - 1,)
            torch.testing.assert_close(got.alphas.sum(1) + got.betas, torch.ones(len(got.words) - 1))


def test_the_search_computes_only_the_running_beams_of_a_decoder_that_reads_no_memory():
    """Show and Tell's step reads only its state: the batched search feeds it the running beams' rows (one per
    image at the first step, fewer as beams complete), not every masked slot, and finds the same captions."""
    decoder, encoder_out = trained_decoder("rnn")
    rows_fed, one_step = [], decoder.one_step

    def counting_step(embeddings, memory, state):
        rows_fed.append(embeddings.size(0))
        return one_step(embeddings, memory, state)

    decoder.one_step = counting_step
    try:
        batched = beam_search(decoder, encoder_out, START, END, 3, max_steps=14)
    finally:
        del decoder.one_step
    batch = len(encoder_out)
    assert rows_fed[0] == batch  # the first step expands only each image's first beam
    assert batch < rows_fed[1] <= 3 * batch and min(rows_fed) < batch  # then up to k beams, fewer as they complete
    reference = [beam_search_one(decoder, encoder_out[i:i + 1], START, END, 3, max_steps=14) for i in range(batch)]
    assert [c.words for c in batched] == [c.words for c in reference]


@pytest.mark.parametrize("name", DECODERS)
def test_beam_size_one_is_greedy(name):
    decoder, encoder_out = trained_decoder(name)
    captions = beam_search(decoder, encoder_out, START, END, beam_size=1, max_steps=14)
    for i, caption in enumerate(captions):
        words, score = greedy(decoder, encoder_out[i], max_steps=14)
        assert caption.words == words
        assert caption.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_larger_beam_never_finds_lower_log_probability(name):
    """Beam search is not monotone in general (greedy can beat k=2 when its path drops out of the
    beam); on these inputs, for k >= 2 and against k = 1 at k = 5, a larger beam never scores lower."""
    decoder, encoder_out = trained_decoder(name)
    scores = {k: [c.score for c in beam_search(decoder, encoder_out, START, END, k, max_steps=14)] for k in (1, 2, 3, 5)}
    for smaller, larger in [(2, 3), (3, 5), (1, 5)]:
        assert all(big >= small - 1e-5 for small, big in zip(scores[smaller], scores[larger])), (smaller, larger)
    assert any(big > small + 1e-3 for small, big in zip(scores[1], scores[5])), "beam search should beat greedy"


# ---------------------------------------------------------------- the options: length_penalty, block_trigrams, n_best

OPTIONS = {"length_penalty": {"length_penalty": 2.0}, "block_trigrams": {"block_trigrams": True},
           "n_best": {"n_best": 5}, "all three": {"length_penalty": 0.7, "block_trigrams": True, "n_best": 3}}


def both_searches(decoder, encoder_out, beam_size, max_steps=14, **options):
    """(batched, reference): per image, its list of Captions, best first, from each search."""
    batched = beam_search(decoder, encoder_out, START, END, beam_size, max_steps, **options)
    reference = [beam_search_one(decoder, encoder_out[i:i + 1], START, END, beam_size, max_steps, **options)
                 for i in range(len(encoder_out))]
    if options.get("n_best", 1) == 1:
        return [[found] for found in batched], [[found] for found in reference]
    return batched, reference


def assert_same_captions(batched, reference):
    assert [[c.words for c in found] for found in batched] == [[c.words for c in found] for found in reference]
    for got, want in zip(batched, reference):
        assert [c.score for c in got] == pytest.approx([c.score for c in want], abs=1e-4)
        assert [c.ranking_score for c in got] == pytest.approx([c.ranking_score for c in want], abs=1e-4)


def repeats_a_trigram(words):
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("option", OPTIONS)
def test_batched_equals_one_at_a_time_with_each_option(name, option):
    decoder, encoder_out = trained_decoder(name)
    assert_same_captions(*both_searches(decoder, encoder_out, 5, **OPTIONS[option]))


def test_batched_equals_one_at_a_time_blocking_the_trigrams_of_a_repeating_decoder():
    decoder, encoder_out = repeating_decoder()
    assert_same_captions(*both_searches(decoder, encoder_out, 3, block_trigrams=True, n_best=3))


@pytest.mark.parametrize("name", DECODERS)
def test_a_length_penalty_of_zero_is_the_default_ranking(name):
    decoder, encoder_out = trained_decoder(name)
    default = beam_search(decoder, encoder_out, START, END, 3, max_steps=14)
    zero = beam_search(decoder, encoder_out, START, END, 3, max_steps=14, length_penalty=0.0)
    assert [(c.words, c.score) for c in zero] == [(c.words, c.score) for c in default]
    assert all(c.ranking_score == c.score for c in zero)
    one = beam_search_one(decoder, encoder_out[:1], START, END, 3, max_steps=14)
    one_zero = beam_search_one(decoder, encoder_out[:1], START, END, 3, max_steps=14, length_penalty=0.0)
    assert (one_zero.words, one_zero.score) == (one.words, one.score)


@pytest.mark.parametrize("name", DECODERS)
def test_a_length_penalty_ranks_longer_captions_higher(name):
    """GNMT's normalisation divides the (negative) total log-probability by more for a longer caption."""
    decoder, encoder_out = trained_decoder(name)
    plain = beam_search(decoder, encoder_out, START, END, 5, max_steps=14)
    penalised = beam_search(decoder, encoder_out, START, END, 5, max_steps=14, length_penalty=2.0)
    assert all(len(p.words) >= len(c.words) for c, p in zip(plain, penalised))
    assert any(len(p.words) > len(c.words) for c, p in zip(plain, penalised))
    for caption in penalised:
        assert caption.ranking_score == pytest.approx(caption.score / ((5 + len(caption.words) - 1) / 6) ** 2.0)


def test_block_trigrams_stops_a_decoder_trained_to_repeat_from_repeating():
    decoder, encoder_out = repeating_decoder()
    plain = beam_search(decoder, encoder_out, START, END, 3, max_steps=14)
    assert sum(repeats_a_trigram(c.words) for c in plain) > len(plain) // 2, "the decoder should repeat itself"
    blocked = beam_search(decoder, encoder_out, START, END, 3, max_steps=14, block_trigrams=True, n_best=3)
    assert not any(repeats_a_trigram(c.words) for found in blocked for c in found)
    one = beam_search_one(decoder, encoder_out[:1], START, END, 3, max_steps=14, block_trigrams=True)
    assert repeats_a_trigram(plain[0].words) and not repeats_a_trigram(one.words)


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("length_penalty", [0.0, 2.0])
def test_n_best_are_distinct_ranked_and_start_with_the_best(name, length_penalty):
    decoder, encoder_out = trained_decoder(name)
    best = beam_search(decoder, encoder_out, START, END, 5, max_steps=14, length_penalty=length_penalty)
    ranked = beam_search(decoder, encoder_out, START, END, 5, max_steps=14, length_penalty=length_penalty, n_best=4)
    for found, first in zip(ranked, best):
        assert len(found) == 4 and len({tuple(c.words) for c in found}) == 4
        assert (found[0].words, found[0].score) == (first.words, first.score)
        complete = [c.words[-1] == END for c in found]
        assert complete == sorted(complete, reverse=True), "complete captions first, then running beams"
        scores = [c.ranking_score for c in found if c.words[-1] == END]
        assert scores == sorted(scores, reverse=True)
    assert all(c.words[-1] == END for c in ranked[0])


@pytest.mark.parametrize("options, message", [
    ({"length_penalty": -0.5}, r"length_penalty = -0.5 must be a number of at least 0 \(--length-penalty"),
    ({"length_penalty": float("nan")}, r"length_penalty = nan must be a number of at least 0"),
    ({"n_best": 4}, r"n_best = 4 must be a whole number from 1 to beam_size \(3\) \(--n-best\)"),
    ({"n_best": 0}, r"n_best = 0 must be a whole number from 1 to beam_size"),
    ({"block_trigrams": "yes"}, r"block_trigrams = 'yes' must be True or False \(--block-trigrams\)"),
])
def test_bad_options_are_refused(options, message):
    decoder, encoder_out = trained_decoder("rnn")
    with pytest.raises(ToolkitError, match=message):
        beam_search(decoder, encoder_out, START, END, 3, **options)
    with pytest.raises(ToolkitError, match=message):
        beam_search_one(decoder, encoder_out[:1], START, END, 3, **options)


# ---------------------------------------------------------------- an ensemble of decoders


def test_an_ensemble_step_is_the_mean_of_its_decoders_log_probabilities():
    """Two decoders of other kinds, grids and channels; two steps (the second reads the state laid end to end)."""
    torch.manual_seed(0)
    decoders = [DecoderWithAttention(10, 8, 12, VOCAB, CHANNELS, dropout=0.0).eval(),
                DecoderWithTransformer(VOCAB, encoder_dim=24, model_dim=16, layers=1, encoder_layers=1, heads=2).eval()]
    encodings = (torch.randn(2, 9, CHANNELS), torch.randn(2, 4, 24))  # (B, P_m, C_m)
    ensemble = Ensemble(decoders)
    words = torch.tensor([START, START])
    with torch.no_grad():
        memory, state = ensemble.start(encodings)
        alone = [decoder.start(encoder_out) for decoder, encoder_out in zip(decoders, encodings)]  # (memory, state)
        for _ in range(2):
            scores, state, attention = ensemble.one_step(ensemble.embedding(words), memory, state)
            steps = [decoder.one_step(decoder.embedding(words), *started) for decoder, started in zip(decoders, alone)]
            log_probs = [F.log_softmax(step_scores, dim=1) for step_scores, _, _ in steps]  # each (B, V)
            torch.testing.assert_close(scores, (log_probs[0] + log_probs[1]) / 2)
            torch.testing.assert_close(attention, steps[0][2])  # the first decoder's
            assert len(state) == len(steps[0][1]) + len(steps[1][1])
            alone = [(started[0], new_state) for started, (_, new_state, _) in zip(alone, steps)]
            words = scores.argmax(dim=1)


def trained_ensemble():
    """An ensemble of an adaptive, an rnn and an attention decoder, and per decoder its own encodings."""
    trained = [trained_decoder(name) for name in ("adaptive", "rnn", "attention")]
    return Ensemble([decoder for decoder, _ in trained]), tuple(encoder_out for _, encoder_out in trained)


@pytest.mark.parametrize("beam_size, options", [(3, {}), (5, OPTIONS["all three"])])
def test_batched_equals_one_at_a_time_on_an_ensemble(beam_size, options):
    ensemble, encodings = trained_ensemble()
    batched = beam_search(ensemble, encodings, START, END, beam_size, 14, **options)
    reference = [beam_search_one(ensemble, tuple(encoder_out[i:i + 1] for encoder_out in encodings), START, END,
                                 beam_size, 14, **options) for i in range(len(encodings[0]))]
    if options.get("n_best", 1) == 1:
        batched, reference = [[found] for found in batched], [[found] for found in reference]
    assert_same_captions(batched, reference)
    assert len({len(found[0].words) for found in reference}) > 2, "captions should end at different steps"
    for got, want in zip(batched, reference):
        assert got[0].alphas.shape == (len(got[0].words) - 1, 9)  # the first decoder's attention and sentinel
        torch.testing.assert_close(got[0].alphas.sum(1) + got[0].betas, torch.ones(len(got[0].words) - 1))
        torch.testing.assert_close(got[0].alphas, want[0].alphas, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_an_ensemble_of_one_decoder_searches_as_the_decoder(name):
    decoder, encoder_out = trained_decoder(name)
    alone = beam_search(decoder, encoder_out, START, END, 3, max_steps=14, n_best=2)
    ensemble = beam_search(Ensemble([decoder]), (encoder_out,), START, END, 3, max_steps=14, n_best=2)
    assert_same_captions(ensemble, alone)
