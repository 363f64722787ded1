"""The teacher-forced pass of every decoder against the step-by-step reference: one `one_step` call per
position, its scores and attention written into (N, T, ...) tensors (the course's loop). The decoders run
only the recurrence step by step and the output layer once over all positions; the results must not change."""
import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import cuda_graphs
from models import DecoderWithAdaptiveAttention, DecoderWithAttention, DecoderWithRNN, DecoderWithTransformer
from models import lay_out, pack, select_rows
from benchmarks.op_counts import OpCounter
from benchmarks.step_counts import graphed_positions
from training_stages import caption_loss

VOCAB, CHANNELS = 30, 16


def step_by_step(decoder, encoder_out, captions, lengths, caption_image):
    """The reference teacher-forced pass: scores (N, T, V) and alphas (N, T, P) or None, sorted by length."""
    encoder_out = encoder_out.reshape(encoder_out.size(0), -1, encoder_out.size(-1))
    lengths, order = lengths.reshape(-1).sort(descending=True)
    captions = captions[order]
    memory, state = decoder.start(encoder_out)
    memory, state = (select_rows(m, caption_image[order]) for m in (memory, state))
    embeddings = decoder.embedding(captions)
    decode_lengths = (lengths - 1).tolist()
    steps = max(decode_lengths)
    scores, alphas = embeddings.new_zeros(len(captions), steps, decoder.vocab_size), None
    for t in range(steps):
        rows = sum(length > t for length in decode_lengths)
        preds, state, alpha = decoder.one_step(embeddings[:rows, t], select_rows(memory, slice(0, rows)),
                                               select_rows(state, slice(0, rows)))
        scores[:rows, t] = preds
        if alpha is not None:
            alphas = embeddings.new_zeros(len(captions), steps, alpha.size(1)) if alphas is None else alphas
            alphas[:rows, t] = alpha
    return scores, captions, decode_lengths, alphas


def make_decoder(name):
    torch.manual_seed(0)
    if name == "transformer":
        return DecoderWithTransformer(VOCAB, CHANNELS, model_dim=32, layers=2, encoder_layers=1, heads=4, ff_dim=64)
    if name.startswith("rnn"):
        decoder = DecoderWithRNN(24, 32, VOCAB, CHANNELS)
        decoder.fused_lstm = name == "rnn"
        return decoder
    return {"attention": DecoderWithAttention, "adaptive": DecoderWithAdaptiveAttention}[name](
        20, 24, 32, VOCAB, CHANNELS)


def grouped_batch(images=3, per_image=5, length=12):
    """Encodings (B, 3, 3, C); B x 5 captions of lengths 2..12 on the CPU, as the loader gives them."""
    generator = torch.Generator().manual_seed(1)
    encoder_out = torch.randn(images, 3, 3, CHANNELS, generator=generator)
    captions = torch.randint(4, VOCAB, (images * per_image, length), generator=generator)
    lengths = torch.randint(2, length + 1, (images * per_image,), generator=generator)
    caption_image = torch.arange(images).repeat_interleave(per_image)
    return encoder_out, captions, lengths, caption_image


@pytest.mark.parametrize("name", ["rnn", "rnn_cell_loop", "attention", "adaptive", "transformer"])
def test_teacher_forced_scores_and_loss_equal_the_step_by_step_pass(name):
    decoder = make_decoder(name).eval()  # eval: no dropout, so both passes see the same numbers
    encoder_out, captions, lengths, caption_image = grouped_batch()
    with torch.no_grad():
        scores, sorted_captions, decode_lengths, alphas, _ = decoder(encoder_out, captions, lengths, caption_image)
        ref_scores, ref_captions, ref_lengths, ref_alphas = step_by_step(decoder, encoder_out, captions, lengths,
                                                                         caption_image)
    assert decode_lengths == ref_lengths and torch.equal(sorted_captions, ref_captions)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    if ref_alphas is None:
        assert alphas is None
    else:
        torch.testing.assert_close(alphas, ref_alphas, rtol=1e-5, atol=1e-5)
    regularize = decoder.attention_regularization
    loss = caption_loss(scores, sorted_captions[:, 1:], decode_lengths, alphas, 1.0, regularize)[0]
    ref_loss = caption_loss(ref_scores, ref_captions[:, 1:], ref_lengths, ref_alphas, 1.0, regularize)[0]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["attention", "adaptive"])
def test_gradients_of_the_teacher_forced_pass_equal_the_step_by_step_ones(name):
    decoder = make_decoder(name).eval()
    encoder_out, captions, lengths, caption_image = grouped_batch(images=2)
    decoder(encoder_out, captions, lengths, caption_image)[0].square().sum().backward()
    grads = [parameter.grad.clone() for parameter in decoder.parameters()]
    decoder.zero_grad()
    step_by_step(decoder, encoder_out, captions, lengths, caption_image)[0].square().sum().backward()
    for grad, parameter in zip(grads, decoder.parameters()):
        torch.testing.assert_close(grad, parameter.grad, rtol=1e-4, atol=1e-5)


class PlainRecurrences(cuda_graphs.RecurrenceGraphs):
    """RecurrenceGraphs whose 'capture' keeps the plain Recurrence module: the graphed path's every-row
    recurrence, segments and packing, run on the CPU. Like a CUDA graph, each runs at most once per pass."""

    def capture(self, key, module, inputs):
        self.graphs[key] = lambda *tensors: self.run_once(key, module, tensors)
        return self.graphs[key]

    def run_once(self, key, module, tensors):
        assert key not in self.ran, f"graph {key[:2]} replayed twice in one pass"
        self.ran.add(key)
        return module(*tensors)

    def __call__(self, *args):
        self.ran = set()
        return super().__call__(*args)


def test_lay_out_equals_pad_packed_sequence_and_so_do_its_gradients():
    running = [5, 5, 4, 2, 2, 1]  # captions of decode lengths 6, 5, 3, 3, 2
    packed = torch.randn(sum(running), 7, requires_grad=True)
    laid_out = lay_out(packed, running)
    reference = pad_packed_sequence(PackedSequence(packed, torch.tensor(running)), batch_first=True)[0]
    assert torch.equal(laid_out, reference) and laid_out.shape == (5, 6, 7)
    weights = torch.randn(5, 6, 7)
    assert torch.equal(torch.autograd.grad((laid_out * weights).sum(), packed)[0],
                       torch.autograd.grad((reference * weights).sum(), packed)[0])
    # pack is its inverse, as pack_padded_sequence
    padded = torch.randn(5, 6, 7, requires_grad=True)
    packed_again = pack(padded, running)
    assert torch.equal(packed_again, pack_padded_sequence(padded, [6, 5, 3, 3, 2], batch_first=True).data)
    assert torch.equal(torch.autograd.grad(packed_again.sum(), padded)[0], (reference != 0).float())
    longer = torch.randn(5, 9, 7)  # more positions than the longest caption needs, as padded captions have
    assert torch.equal(pack(longer, running), pack_padded_sequence(longer, [6, 5, 3, 3, 2], batch_first=True).data)


def test_segments_run_the_long_captions_rows_only_and_end_at_the_padded_length():
    lengths = [50, 40, 20] + [10] * 97  # 100 captions, sorted
    assert cuda_graphs.segments(lengths, 52) == [(0, 16, 100, 100), (16, 16, 16, 3), (32, 16, 16, 2), (48, 4, 16, 1)]
    assert [cuda_graphs.segment_rows(running, 100) for running in (1, 16, 17, 33, 64, 65, 100)] == \
        [16, 16, 32, 64, 64, 100, 100]


def test_graphed_positions_count_each_segments_rows_for_its_steps():
    decode_lengths = np.full((4, 5), 3)
    decode_lengths[0, 0] = 17  # 4 images x 5 captions: 17 + 19 x 3 = 74 positions needed
    # together: the 20 captions for the first 16 steps, then 16 rows (a segment's fewest) for the next 16; as one
    # graph, the 20 captions for 32 steps
    assert graphed_positions(decode_lengths, [[0, 1, 2, 3]]) == pytest.approx(((20 * 16 + 16 * 16) / 74, 20 * 32 / 74))
    # apart: the long caption's 5 rows for two segments, the 15 short captions for one
    assert graphed_positions(decode_lengths, [[0], [1, 2, 3]]) == pytest.approx(((5 * 32 + 15 * 16) / 74,) * 2)


@pytest.mark.parametrize("name", ["rnn_cell_loop", "attention", "adaptive"])
def test_the_segmented_recurrence_of_cuda_graphs_equals_the_step_by_step_pass(name):
    decoder = make_decoder(name).train()
    inputs = grouped_batch(images=8, length=20)  # 40 captions, decode lengths up to 19: two segments of 16 steps
    torch.manual_seed(2)
    scores, _, lengths, alphas, _ = decoder(*inputs)
    decoder.training_graphs = graphs = PlainRecurrences(decoder)
    torch.manual_seed(2)
    graphed_scores, _, graphed_lengths, graphed_alphas, _ = decoder(*inputs)
    long_captions = sum(length > 16 for length in lengths)
    assert graphed_lengths == lengths and 0 < long_captions <= 16
    # (segment, steps, rows): every caption for 16 steps, then the 16 rows that hold the long ones for the last 4
    # (L = 20)
    assert [(key[0], key[1], key[3][0][0][0]) for key in graphs.graphs] == [(0, 16, 40), (1, 4, 16)]
    torch.testing.assert_close(graphed_scores, scores, rtol=1e-5, atol=1e-5)
    if alphas is not None:
        torch.testing.assert_close(graphed_alphas, alphas, rtol=1e-5, atol=1e-5)
    parameters = [p for p in decoder.parameters() if p.requires_grad]
    graphed_grads = torch.autograd.grad(graphed_scores.sum(), parameters, allow_unused=True)
    decoder.training_graphs = None
    torch.manual_seed(2)
    grads = torch.autograd.grad(decoder(*inputs)[0].sum(), parameters, allow_unused=True)
    for got, want in zip(graphed_grads, grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class PlainLayerGraphs(cuda_graphs.LayerGraphs):
    """LayerGraphs whose 'capture' keeps the plain module: the padding and slicing of the graphed path on the CPU."""

    def capture(self, key, module, inputs):
        self.graphs[key] = module
        return module


def test_the_graphed_transformer_layers_equal_the_plain_pass():
    decoder = make_decoder("transformer").train()
    for layer in decoder.layers:  # no dropout in the decoder layers: the padded pass would draw other masks
        layer.dropout_p = 0.0
        for module in layer.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    inputs = grouped_batch(images=4, length=20)  # decode lengths up to 19: padded to 32 positions
    torch.manual_seed(2)  # the same dropout before the layers (over the grid, the embeddings) in both passes
    scores, _, lengths, alphas, _ = decoder(*inputs)
    parameters = [p for p in decoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(scores.square().sum(), parameters, allow_unused=True)
    decoder.training_graphs = graphs = PlainLayerGraphs(decoder)
    torch.manual_seed(2)
    graphed_scores, _, _, graphed_alphas, _ = decoder(*inputs)
    assert [key[0][0] for key in graphs.graphs] == [torch.Size([20, 32, 32])]  # (N, T rounded up to 32, D)
    torch.testing.assert_close(graphed_scores, scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed_alphas, alphas, rtol=1e-5, atol=1e-5)
    graphed_grads = torch.autograd.grad(graphed_scores.square().sum(), parameters, allow_unused=True)
    for got, want in zip(graphed_grads, grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, graphs, wanted", [
    ("attention", None, cuda_graphs.RecurrenceGraphs), ("adaptive", True, cuda_graphs.RecurrenceGraphs),
    ("attention", False, type(None)), ("rnn", None, type(None)), ("rnn_cell_loop", None, cuda_graphs.RecurrenceGraphs),
    ("transformer", None, type(None)), ("transformer", True, cuda_graphs.LayerGraphs)])
def test_the_trainer_graphs_what_cfg_cuda_graphs_says_on_one_cuda_gpu(name, graphs, wanted):
    decoder, cfg = make_decoder(name), {"cuda_graphs": graphs}
    assert isinstance(cuda_graphs.training_graphs(cfg, decoder, torch.device("cuda"), False), wanted)
    assert cuda_graphs.training_graphs(cfg, decoder, torch.device("cpu"), False) is None
    assert cuda_graphs.training_graphs(cfg, decoder, torch.device("cuda"), True) is None  # several processes


def test_the_graphed_recurrence_casts_each_weight_once_under_autocast_and_computes_the_same():
    """Autocast runs without its cache under CUDA graphs: the graphed recurrence casts the weights and the memory
    itself, once, instead of autocast casting each at every step; the numbers do not change."""
    decoder = make_decoder("attention").train()
    embeddings, captions, lengths, caption_image = grouped_batch(images=4, length=20)
    counts = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        memory, state = decoder.start(embeddings.reshape(4, 9, CHANNELS)[caption_image])  # as in training
        inputs = (decoder.embedding(captions), *memory, *state)
        recurrence = cuda_graphs.Recurrence(decoder, 19, len(memory))
        for weights_cast in (True, False):  # True: autocast casts the weights at every step
            with OpCounter(decoder.parameters()) as counts[weights_cast]:
                outputs = recurrence(*inputs, weights_cast=weights_cast)
            counts[weights_cast].outputs = outputs
    for got, want in zip(counts[False].outputs, counts[True].outputs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    weights = sum(1 for _ in decoder.parameters())
    # the step's weights (attention, gate, LSTM cell: 10 tensors) and the pooled memory cast at each of 19 steps,
    # against once
    assert counts[False].by_operation["_to_copy"] <= counts[True].by_operation["_to_copy"] - 19 * 9 + weights + 2


def test_a_failed_capture_warns_and_the_decoder_goes_on_step_by_step(monkeypatch):
    def no_graphs(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", no_graphs)
    decoder = make_decoder("attention").train()  # the graphed path runs in training only
    decoder.dropout.eval()  # no dropout: the two passes compare exactly
    inputs = grouped_batch()
    reference = decoder(*inputs)[0]
    decoder.training_graphs = cuda_graphs.RecurrenceGraphs(decoder)
    with pytest.warns(UserWarning, match="could not be captured"):
        scores = decoder(*inputs)[0]
    assert decoder.training_graphs is None  # the next batches run step by step
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)
