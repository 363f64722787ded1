"""The decoders' shapes and invariants, and the fused nn.LSTM pass against the step-by-step loop."""
import pytest
import torch

from models import Attention, DecoderWithAdaptiveAttention, DecoderWithAttention, DecoderWithRNN

VOCAB, CHANNELS = 20, 16


def batch(seed=0):
    """Encodings (4, 3, 3, C) and 4 captions with different lengths."""
    torch.manual_seed(seed)
    encoder_out = torch.randn(4, 3, 3, CHANNELS)
    captions = torch.randint(4, VOCAB, (4, 9))
    lengths = torch.tensor([[5], [9], [3], [7]])
    return encoder_out, captions, lengths


def test_attention_weights_sum_to_one():
    attention = Attention(CHANNELS, 12, 10)
    encoder_out, hidden = torch.randn(4, 9, CHANNELS), torch.randn(4, 12)
    weighted, alpha = attention(encoder_out, hidden)
    assert weighted.shape == (4, CHANNELS) and alpha.shape == (4, 9)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(weighted, (encoder_out * alpha.unsqueeze(2)).sum(dim=1))


def test_attention_shares_one_memory_row_among_beams():
    """attend with k consecutive hidden rows per image equals attend on the memory repeated k times."""
    torch.manual_seed(0)
    attention = Attention(CHANNELS, 12, 10)
    encoder_out, hidden = torch.randn(2, 9, CHANNELS), torch.randn(6, 12)
    shared = attention.attend(attention.encoder_att(encoder_out), encoder_out, hidden)
    repeated_out = encoder_out.repeat_interleave(3, dim=0)
    repeated = attention.attend(attention.encoder_att(repeated_out), repeated_out, hidden)
    for got, want in zip(shared, repeated):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("decoder_class, attention_size", [
    (DecoderWithRNN, None), (DecoderWithAttention, 9), (DecoderWithAdaptiveAttention, 10)])
def test_decoder_outputs_are_sorted_and_shaped(decoder_class, attention_size):
    encoder_out, captions, lengths = batch()
    if decoder_class is DecoderWithRNN:
        decoder = DecoderWithRNN(8, 12, VOCAB, CHANNELS)
    else:
        decoder = decoder_class(10, 8, 12, VOCAB, CHANNELS)
    predictions, sorted_captions, decode_lengths, alphas, sort_ind = decoder(encoder_out, captions, lengths)
    assert sort_ind.tolist() == [1, 3, 0, 2]
    assert decode_lengths == [8, 6, 4, 2]
    assert torch.equal(sorted_captions, captions[sort_ind])
    assert predictions.shape == (4, 8, VOCAB)
    assert torch.all(predictions[3, 2:] == 0)  # nothing predicted past a caption's end
    if attention_size is None:
        assert alphas is None
    else:
        assert alphas.shape == (4, 8, attention_size)
        running = alphas[0]  # the longest caption runs every step
        torch.testing.assert_close(running.sum(dim=1), torch.ones(8))


def test_adaptive_sentinel_weight_is_a_probability():
    encoder_out, captions, lengths = batch(1)
    decoder = DecoderWithAdaptiveAttention(10, 8, 12, VOCAB, CHANNELS)
    _, _, decode_lengths, alphas, _ = decoder(encoder_out, captions, lengths)
    for row, length in enumerate(decode_lengths):
        betas = alphas[row, :length, -1]
        assert torch.all((betas >= 0) & (betas <= 1))
        torch.testing.assert_close(alphas[row, :length, :-1].sum(dim=1) + betas, torch.ones(length))


def test_adaptive_uses_the_current_hidden_state_for_spatial_attention():
    """z_t depends on h_t: the same previous state with different words gives different maps."""
    decoder = DecoderWithAdaptiveAttention(10, 8, 12, VOCAB, CHANNELS).eval()
    memory, state = decoder.start(torch.randn(1, 9, CHANNELS))
    words = decoder.embedding(torch.tensor([4, 5]))
    memory2, state2 = tuple(m.expand(2, *m.shape[1:]) for m in memory), tuple(s.expand(2, -1) for s in state)
    _, _, alpha_hat = decoder.one_step(words, memory2, state2)
    assert not torch.allclose(alpha_hat[0], alpha_hat[1])


def test_fused_lstm_equals_the_cell_loop():
    encoder_out, captions, lengths = batch(2)
    decoder = DecoderWithRNN(8, 12, VOCAB, CHANNELS, dropout=0.0)
    fused = decoder(encoder_out, captions, lengths)[0]
    fused.pow(2).sum().backward()
    fused_grads = [p.grad.clone() for p in decoder.parameters()]
    decoder.zero_grad()
    decoder.fused_lstm = False
    looped = decoder(encoder_out, captions, lengths)[0]
    looped.pow(2).sum().backward()
    torch.testing.assert_close(fused, looped, rtol=1e-5, atol=1e-6)
    for fused_grad, parameter in zip(fused_grads, decoder.parameters()):
        torch.testing.assert_close(fused_grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_fused_lstm_adds_no_parameters():
    decoder = DecoderWithRNN(8, 12, VOCAB, CHANNELS)
    assert not any("sequence_lstm" in key for key in decoder.state_dict())
    assert {"decode_step.weight_ih", "init.weight", "bn.running_mean", "fc.weight"} <= set(decoder.state_dict())
