"""The Transformer decoder: shapes, incremental decoding against the causal pass, learning, beam search, cfg."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from beam_search import beam_search, beam_search_one
from models import (DecoderWithAdaptiveAttention, DecoderWithAttention, DecoderWithRNN, DecoderWithTransformer,
                    cross_attention, select_rows)
from utils import ToolkitError

VOCAB, CHANNELS, START, END = 30, 16, 1, 3
WIDTH, LAYERS, HEADS = 32, 2, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small run faster on one thread: on a loaded 2-core machine a second thread costs more
    in hand-offs than it computes (measured: 20 training steps 8.4 s on 2 threads, 0.6 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_transformer(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return DecoderWithTransformer(VOCAB, CHANNELS, model_dim=WIDTH, layers=LAYERS, encoder_layers=1, heads=HEADS,
                                  ff_dim=64, dropout=dropout)


def random_captions(count, max_words, generator=None):
    """<start> w_1 .. w_n <end> <pad>.. with 1 <= n <= max_words random words: (count, max_words + 2), lengths."""
    lengths = torch.randint(1, max_words + 1, (count,), generator=generator)
    captions = torch.zeros(count, max_words + 2, dtype=torch.long)
    for i, length in enumerate(lengths):
        captions[i, 0], captions[i, length + 1] = START, END
        captions[i, 1:length + 1] = torch.randint(4, VOCAB, (length,), generator=generator)
    return captions, lengths + 2


def train(decoder, encoder_out, captions, lengths, steps, lr):
    """Teacher-forced cross-entropy with Adam; returns the loss of every step."""
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        scores, sorted_captions, decode_lengths, _, _ = decoder(encoder_out, captions, lengths)
        loss = F.cross_entropy(pack_padded_sequence(scores, decode_lengths, batch_first=True).data,
                               pack_padded_sequence(sorted_captions[:, 1:], decode_lengths, batch_first=True).data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_teacher_forced_outputs_are_sorted_shaped_and_zero_past_each_end():
    decoder = small_transformer(dropout=0.1)
    torch.manual_seed(1)
    encoder_out = torch.randn(4, 3, 3, CHANNELS)  # (B, G, G, C)
    captions, lengths = torch.randint(4, VOCAB, (4, 9)), torch.tensor([[5], [9], [3], [7]])
    predictions, sorted_captions, decode_lengths, alphas, sort_ind = decoder(encoder_out, captions, lengths)
    assert sort_ind.tolist() == [1, 3, 0, 2] and decode_lengths == [8, 6, 4, 2]
    assert torch.equal(sorted_captions, captions[sort_ind])
    assert predictions.shape == (4, 8, VOCAB) and predictions.dtype == torch.float32
    assert alphas.shape == (4, 8, 9) and alphas.dtype == torch.float32
    for row, length in enumerate(decode_lengths):
        torch.testing.assert_close(alphas[row, :length].sum(dim=1), torch.ones(length))
        assert torch.all(predictions[row, length:] == 0) and torch.all(alphas[row, length:] == 0)
        assert torch.all(predictions[row, :length] != 0)
    predictions.sum().backward()  # one causal pass, trainable end to end
    assert all(parameter.grad is not None for parameter in decoder.parameters())


def test_a_step_grows_the_cache_by_one_position():
    decoder = small_transformer().eval()
    memory, state = decoder.start(torch.randn(2, 9, CHANNELS))
    assert len(memory) == len(state) == 2 * LAYERS
    assert all(tensor.shape == (2, HEADS, 9, WIDTH // HEADS) for tensor in memory)
    assert all(tensor.shape == (2, HEADS, 0, WIDTH // HEADS) for tensor in state)
    state = select_rows(state, torch.tensor([0, 0, 0, 1, 1, 1]))  # 3 rows per image, as beam search
    with torch.no_grad():
        for length in (1, 2):
            scores, state, attention = decoder.one_step(decoder.embedding(torch.randint(4, VOCAB, (6,))), memory, state)
            assert scores.shape == (6, VOCAB) and attention.shape == (6, 9)
            assert all(tensor.shape == (6, HEADS, length, WIDTH // HEADS) for tensor in state)
            torch.testing.assert_close(attention.sum(dim=1), torch.ones(6))


def test_mixed_precision_runs_in_bfloat16():
    decoder = small_transformer()
    captions, lengths = random_captions(3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        predictions, _, _, alphas, _ = decoder(torch.randn(3, 9, CHANNELS), captions, lengths)
        memory, state = decoder.start(torch.randn(1, 9, CHANNELS))
        scores, state, attention = decoder.one_step(decoder.embedding(torch.tensor([START])), memory, state)
    assert predictions.dtype == scores.dtype == torch.bfloat16
    assert torch.isfinite(predictions).all() and torch.isfinite(scores).all() and torch.isfinite(attention).all()


def test_cross_attention_with_weights_equals_scaled_dot_product_attention():
    """The last layer's explicit path (that keeps the weights) against torch's kernel, with 3 query rows
    sharing each of 2 memory rows and 4 positions per row."""
    torch.manual_seed(0)
    queries, keys, values = torch.randn(6, HEADS, 4, 8), torch.randn(2, HEADS, 9, 8), torch.randn(2, HEADS, 9, 8)
    fast, no_weights = cross_attention(queries, keys, values)
    explicit, weights = cross_attention(queries, keys, values, need_weights=True)
    copied = F.scaled_dot_product_attention(queries, keys.repeat_interleave(3, 0), values.repeat_interleave(3, 0))
    torch.testing.assert_close(fast, copied)
    torch.testing.assert_close(explicit, copied)
    assert no_weights is None and weights.shape == (6, 4, 9)
    scores = queries @ keys.repeat_interleave(3, 0).transpose(2, 3) / 8 ** 0.5  # (6, H, 4, 9)
    torch.testing.assert_close(weights, scores.softmax(dim=-1).mean(dim=1))


def test_incremental_steps_equal_the_causal_pass_after_reordering_rows():
    """2 images x 3 rows stepped one word at a time, the rows reordered within each image after every step
    (as beam search does: rows copied or dropped); every step's scores and attention equal those of one
    teacher-forced pass over each row's final words."""
    decoder = small_transformer(seed=2).eval()
    encoder_out = torch.randn(2, 9, CHANNELS)
    generator = torch.Generator().manual_seed(3)
    steps, rows = 7, 6
    image_of_row = torch.arange(2).repeat_interleave(3)  # (6,)
    with torch.no_grad():
        memory, state = decoder.start(encoder_out)
        state = select_rows(state, image_of_row)
        words = torch.full((rows, 1), START)
        step_scores, step_attention = torch.zeros(rows, 0, VOCAB), torch.zeros(rows, 0, 9)
        for _ in range(steps):
            scores, state, attention = decoder.one_step(decoder.embedding(words[:, -1]), memory, state)
            step_scores = torch.cat([step_scores, scores.unsqueeze(1)], dim=1)
            step_attention = torch.cat([step_attention, attention.unsqueeze(1)], dim=1)
            parent = image_of_row * 3 + torch.randint(0, 3, (rows,), generator=generator)  # a row of the same image
            state = select_rows(state, parent)
            words, step_scores, step_attention = words[parent], step_scores[parent], step_attention[parent]
            words = torch.cat([words, torch.randint(4, VOCAB, (rows, 1), generator=generator)], dim=1)
        full_memory, full_state = (select_rows(tensors, image_of_row) for tensors in decoder.start(encoder_out))
        full_scores, full_attention = decoder.decode_teacher_forced(decoder.embedding(words), full_memory, full_state,
                                                                    [steps] * rows)
    torch.testing.assert_close(step_scores, full_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(step_attention, full_attention, atol=1e-5, rtol=0)


def test_it_overfits_a_few_captions_and_beam_search_recalls_them():
    decoder = small_transformer()
    torch.manual_seed(4)
    encoder_out = torch.randn(4, 3, 3, CHANNELS)
    captions, lengths = random_captions(4, 6)
    losses = train(decoder, encoder_out, captions, lengths, steps=60, lr=3e-3)
    assert losses[-1] < 0.02 * losses[0], (losses[0], losses[-1])
    decoder.eval()
    for image in range(4):
        caption = beam_search_one(decoder, encoder_out[image:image + 1], START, END, beam_size=3, max_steps=10)
        assert caption.words == captions[image, :lengths[image]].tolist()
        assert caption.alphas.shape == (len(caption.words) - 1, 9) and caption.betas is None


@functools.cache
def briefly_trained():
    """A decoder trained a little on 24 random encodings and captions of 1 to 8 words, so that its captions
    end after varied numbers of steps and its distributions are not all peaked."""
    decoder = small_transformer()
    torch.manual_seed(5)
    encoder_out = torch.randn(24, 3, 3, CHANNELS)
    train(decoder, encoder_out, *random_captions(24, 8), steps=60, lr=3e-3)
    return decoder.eval(), encoder_out


@pytest.mark.parametrize("beam_size", [1, 3, 5])
def test_batched_beam_search_equals_one_image_beam_search(beam_size):
    decoder, encoder_out = briefly_trained()
    batched = beam_search(decoder, encoder_out, START, END, beam_size, max_steps=14)
    reference = [beam_search_one(decoder, encoder_out[i:i + 1], START, END, beam_size, max_steps=14)
                 for i in range(len(encoder_out))]
    assert [c.words for c in batched] == [c.words for c in reference]
    assert [c.score for c in batched] == pytest.approx([c.score for c in reference], abs=1e-4)
    assert len({len(c.words) for c in reference}) > 2, "captions should end at different steps"
    for got, want in zip(batched, reference):
        torch.testing.assert_close(got.alphas, want.alphas, atol=1e-5, rtol=0)


CFG = {"embed_dim": 8, "attention_dim": 10, "decoder_dim": 12, "dropout": 0.2}


@pytest.mark.parametrize("decoder_class", [DecoderWithRNN, DecoderWithAttention, DecoderWithAdaptiveAttention])
def test_every_lstm_decoder_builds_from_a_cfg(decoder_class):
    decoder = decoder_class.from_cfg(CFG, VOCAB, CHANNELS)
    assert (decoder.embed_dim, decoder.decoder_dim, decoder.vocab_size, decoder.encoder_dim) == (8, 12, VOCAB, CHANNELS)
    assert decoder.dropout.p == 0.2
    if decoder_class is not DecoderWithRNN:
        assert decoder.attention_dim == 10


def test_transformer_builds_from_its_cfg_keys():
    cfg = dict(CFG, decoder_dim=24, transformer_layers=3, transformer_encoder_layers=0, transformer_heads=6,
               transformer_ff_dim=40, transformer_dropout=0.2)
    decoder = DecoderWithTransformer.from_cfg(cfg, VOCAB, CHANNELS)
    assert decoder.embedding.embedding_dim == decoder.decoder_dim == 24  # embed_dim is not used
    assert len(decoder.layers) == 3 and isinstance(decoder.grid_encoder, torch.nn.Identity)
    assert decoder.heads == 6 and decoder.layers[0].ff[0].out_features == 40 and decoder.dropout.p == 0.2
    defaults = DecoderWithTransformer.from_cfg({}, VOCAB, 2048)  # self-critical.pytorch's COCO Transformer
    assert (defaults.decoder_dim, len(defaults.layers), len(defaults.grid_encoder.layers), defaults.heads,
            defaults.layers[0].ff[0].out_features, defaults.dropout.p) == (512, 6, 6, 8, 2048, 0.1)


def test_transformer_refuses_a_width_its_heads_do_not_divide():
    with pytest.raises(ToolkitError, match="decoder_dim=30.*transformer_heads=8"):
        DecoderWithTransformer.from_cfg({"decoder_dim": 30, "transformer_heads": 8}, VOCAB, CHANNELS)


def test_decoders_declare_their_behaviour():
    declared = {cls: (cls.has_attention, cls.has_sentinel, cls.attention_regularization, cls.lr_warmup)
                for cls in (DecoderWithRNN, DecoderWithAttention, DecoderWithAdaptiveAttention, DecoderWithTransformer)}
    assert declared == {DecoderWithRNN: (False, False, False, False),
                        DecoderWithAttention: (True, False, True, False),
                        DecoderWithAdaptiveAttention: (True, True, False, False),
                        DecoderWithTransformer: (True, False, False, True)}
