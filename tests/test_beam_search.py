"""Beam search: batched against the one-image reference, greedy at k=1, larger beams score higher."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from beam_search import beam_search, beam_search_one
from models import DecoderWithAdaptiveAttention, DecoderWithAttention, DecoderWithRNN

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
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for _ in range(100):
        scores, sorted_captions, decode_lengths, _, _ = decoder(encoder_out, captions, lengths + 2)
        loss = F.cross_entropy(pack_padded_sequence(scores, decode_lengths, batch_first=True).data,
                               pack_padded_sequence(sorted_captions[:, 1:], decode_lengths, batch_first=True).data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return decoder.eval(), encoder_out


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
