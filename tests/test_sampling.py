"""sampling.py: sampled log-probabilities equal teacher forcing for every decoder, masking after <end>,
greedy = beam search with one beam, seeded repeatability, and the SCST loss moving log-probabilities
the way its rewards say, with both baselines."""
import pytest
import torch
import torch.nn.functional as F

from beam_search import beam_search
from models import DecoderWithAdaptiveAttention, DecoderWithAttention, DecoderWithRNN
from sampling import draw_words, greedy_baseline, greedy_captions, mean_baseline, sample_captions, scst_loss

VOCAB, START, END = 12, 10, 11
ENCODER_DIM = 8
DECODERS = {
    "rnn": lambda: DecoderWithRNN(16, 16, VOCAB, encoder_dim=ENCODER_DIM, dropout=0.5),
    "attention": lambda: DecoderWithAttention(16, 16, 16, VOCAB, encoder_dim=ENCODER_DIM, dropout=0.5),
    "adaptive": lambda: DecoderWithAdaptiveAttention(16, 16, 16, VOCAB, encoder_dim=ENCODER_DIM, dropout=0.5),
}


def make_decoder(name, seed=0):
    torch.manual_seed(seed)
    decoder = DECODERS[name]()
    decoder.eval()  # dropout off (and the rnn decoder's BatchNorm on its running statistics)
    return decoder


def encodings(images=4, seed=1):
    return torch.randn(images, 2, 2, ENCODER_DIM, generator=torch.Generator().manual_seed(seed))  # (B, G, G, C)


def teacher_forced_log_probs(decoder, encoder_out, samples):
    """log p of each sampled word (N, T) from decoder.forward fed <start> and the sampled words; 0 after <end>."""
    rows = samples.words.size(0)
    captions = torch.cat([torch.full((rows, 1), START), samples.words], dim=1)  # (N, T + 1)
    lengths = samples.mask.sum(dim=1) + 1  # <start> + the generated words
    predictions, sorted_captions, _, _, sort_ind = decoder(encoder_out, captions, lengths, samples.image)
    chosen = F.log_softmax(predictions, dim=2).gather(2, sorted_captions[:, 1:, None]).squeeze(2)  # (N, T) sorted
    unsorted = torch.empty_like(chosen)
    unsorted[sort_ind] = chosen
    return unsorted.masked_fill(~samples.mask, 0.0)


@pytest.mark.parametrize("name", DECODERS)
def test_sampled_log_probs_equal_teacher_forcing(name):
    decoder, encoder_out = make_decoder(name), encodings()
    samples = sample_captions(decoder, encoder_out, 3, START, END, max_steps=9,
                              generator=torch.Generator().manual_seed(0))
    assert samples.words.shape == samples.log_probs.shape == samples.mask.shape and samples.words.size(0) == 12
    assert samples.image.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert samples.log_probs.requires_grad
    assert not decoder.training  # the caller's mode is kept
    lengths = samples.mask.sum(dim=1)
    assert lengths.min() < lengths.max()  # captions of different lengths: the sort and the masking count
    expected = teacher_forced_log_probs(decoder, encoder_out, samples)
    torch.testing.assert_close(samples.log_probs.detach(), expected.detach(), rtol=0, atol=1e-5)
    assert samples.words.unique().numel() > 3  # really sampled, not one word repeated


def test_masking_after_end_and_early_stop():
    decoder = make_decoder("attention")
    decoder.fc.bias.data[END] = 2.0  # <end> likely: captions of different lengths, all ended early
    samples = sample_captions(decoder, encodings(8), 4, START, END, max_steps=30,
                              generator=torch.Generator().manual_seed(0))
    lengths = samples.mask.sum(dim=1)
    steps = samples.words.size(1)
    assert steps < 30 and steps == lengths.max()  # stopped once every caption had ended
    assert lengths.min() < steps  # some captions ended before others
    for words, log_probs, mask, length in zip(samples.words, samples.log_probs, samples.mask, lengths):
        assert mask[:length].all() and not mask[length:].any()  # True up to and including <end>
        assert words[length - 1] == END and (words[:length - 1] != END).all()
        assert (words[length:] == 0).all() and (log_probs[length:] == 0).all()
        assert (log_probs[:length] < 0).all()
    captions = samples.captions(END)
    assert [len(caption) for caption in captions] == (lengths - 1).tolist()
    assert captions[0] == samples.words[0, :lengths[0] - 1].tolist()


def test_a_caption_without_end_keeps_all_its_words():
    decoder = make_decoder("rnn")
    decoder.fc.bias.data[END] = -50.0  # never <end>
    samples = sample_captions(decoder, encodings(2), 2, START, END, max_steps=5,
                              generator=torch.Generator().manual_seed(0))
    assert samples.mask.all() and samples.words.shape == (4, 5)
    assert [len(caption) for caption in samples.captions(END)] == [5, 5, 5, 5]


END_BIAS = {"rnn": 0.0, "attention": 0.0, "adaptive": 1.0}


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_equals_beam_search_with_one_beam(name):
    decoder = make_decoder(name)
    with torch.no_grad():  # large weights: greedy captions that differ between images, some ending early
        for parameter in decoder.parameters():
            parameter.mul_(10)
        decoder.fc.bias[END] += END_BIAS[name]
    encoder_out = encodings(8)
    greedy = greedy_captions(decoder, encoder_out, START, END, max_steps=10)
    assert not greedy.log_probs.requires_grad
    beams = beam_search(decoder, encoder_out, START, END, beam_size=1, max_steps=10)
    ended = (greedy.words == END).any(dim=1)
    assert ended.any() and not ended.all()
    for words, mask, caption in zip(greedy.words, greedy.mask, beams):
        assert [START] + words[mask].tolist() == caption.words


class AttentionCountingRows(DecoderWithAttention):
    """A decoder that checks each step gets every sample's row: n consecutive state rows per memory row."""

    def one_step(self, embeddings, memory, state):
        assert memory[0].size(0) == 4 and state[0].size(0) == embeddings.size(0) == 4 * 3
        return super().one_step(embeddings, memory, state)


def test_every_row_runs_every_step_and_ended_rows_are_masked():
    plain = make_decoder("attention")
    counting = AttentionCountingRows(16, 16, 16, VOCAB, encoder_dim=ENCODER_DIM).eval()
    counting.load_state_dict(plain.state_dict())
    encoder_out = encodings()
    samples = [sample_captions(decoder, encoder_out, 3, START, END, max_steps=9,
                               generator=torch.Generator().manual_seed(0)) for decoder in (plain, counting)]
    lengths = samples[1].mask.sum(dim=1)
    assert lengths.min() < lengths.max()  # rows ended while others ran on
    assert torch.equal(samples[0].words, samples[1].words) and torch.equal(samples[0].mask, samples[1].mask)
    torch.testing.assert_close(samples[1].log_probs, samples[0].log_probs, rtol=0, atol=0)


def test_drawn_words_follow_the_distribution_like_multinomial():
    probabilities = torch.tensor([0.5, 0.0, 0.2, 0.2, 0.1, 0.0])
    rows = 200_000
    log_probs = probabilities.log().expand(rows, -1)
    drawn = draw_words(log_probs, torch.Generator().manual_seed(0))
    reference = torch.multinomial(probabilities.expand(rows, -1), 1, generator=torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=6).double() / rows
    reference_frequencies = torch.bincount(reference.squeeze(1), minlength=6).double() / rows
    torch.testing.assert_close(frequencies, probabilities.double(), rtol=0, atol=0.005)  # 4.5 standard errors
    torch.testing.assert_close(frequencies, reference_frequencies, rtol=0, atol=0.006)
    assert frequencies[1] == 0 and frequencies[5] == 0  # never a word of probability 0, first or last


def test_seeded_sampling_is_repeatable():
    decoder, encoder_out = make_decoder("adaptive"), encodings()

    def draw(seed):
        return sample_captions(decoder, encoder_out, 5, START, END, max_steps=8,
                               generator=torch.Generator().manual_seed(seed)).words
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="one caption per image"):
        sample_captions(make_decoder("rnn"), encodings(), 2, START, END, greedy=True)
    with pytest.raises(ValueError, match="max_steps >= 1"):
        sample_captions(make_decoder("rnn"), encodings(), 2, START, END, max_steps=0)


def test_sampling_in_train_mode_keeps_it_and_reaches_every_step_of_the_graph():
    decoder = make_decoder("adaptive").train()  # dropout on
    samples = sample_captions(decoder, encodings(), 2, START, END, max_steps=6,
                              generator=torch.Generator().manual_seed(0))
    assert decoder.training
    samples.log_probs.sum().backward()
    assert decoder.fc.weight.grad.abs().sum() > 0 and decoder.region_proj.weight.grad.abs().sum() > 0


def test_baselines_and_loss_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    torch.testing.assert_close(mean_baseline(rewards), torch.tensor([[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]]))
    torch.testing.assert_close(greedy_baseline(torch.tensor([0.5, 1.0]), 3),
                               torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_baseline(torch.ones(3, 1))
    log_probs = torch.tensor([[-1.0, -2.0], [-3.0, -7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    # advantages 2 and -1: -(2 * -1 + 2 * -2 + -1 * -3) / 3 sampled words = 1
    loss = scst_loss(log_probs, mask, torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(1.0)


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_one_step_raises_the_better_sample_and_lowers_the_worse(baseline):
    decoder, encoder_out = make_decoder("attention"), encodings(1)
    samples = sample_captions(decoder, encoder_out, 2, START, END, max_steps=6,
                              generator=torch.Generator().manual_seed(0))
    assert not torch.equal(samples.words[0], samples.words[1])
    rewards = torch.tensor([[1.0, 0.0]])  # sample 0 is the better one
    baselines = mean_baseline(rewards) if baseline == "mean" else greedy_baseline(torch.tensor([0.5]), 2)
    before = teacher_forced_log_probs(decoder, encoder_out, samples).sum(dim=1).detach()  # (2,)
    optimizer = torch.optim.SGD(decoder.parameters(), lr=0.05)
    optimizer.zero_grad()
    scst_loss(samples.log_probs, samples.mask, rewards, baselines).backward()
    optimizer.step()
    after = teacher_forced_log_probs(decoder, encoder_out, samples).sum(dim=1).detach()
    assert after[0] > before[0] and after[1] < before[1]
