"""The teacher-forced pass of a training step replayed as CUDA graphs (a GPU's launch overhead removed).

Step by step, a recurrent decoder launches a few dozen small kernels per word position, forward and backward:
on a GPU the step is then bound by the Python that launches them, not by the GPU. A CUDA graph records those
launches once and replays them as one. A graph has fixed shapes, so the graphed recurrence runs in segments of
SEGMENT_STEPS steps: each segment runs a fixed number of rows through all its steps (models.RecurrentDecoder.recur;
positions past a caption's end are computed and never read). The captions are sorted by decreasing length, so the
rows still running when a segment starts are the first ones: the first segment runs every caption, the later ones
only the long captions' rows (their count rounded up to a power of two), which is where a batch's few long
captions would otherwise make every caption run for their length. Each (segment, rows, shapes) has its own graph,
captured the first time it is needed (torch.cuda.make_graphed_callables: forward and backward; a graph may run
only once between two backward passes, so two segments never share one). Evaluation runs the plain step-by-step
loop.

Autocast must run without its weight-cast cache under graphs, and it casts activations at every use: so under
autocast the recurrence casts the weights, and the memory that start() gives and the steps' matrix products
read, once for each segment.

The Transformer's decoder layers launch a few thousand kernels a step, forward and backward, whatever the batch
(3,213 aten operations for 6 + 6 layers at COCO's sizes, counted on the CPU): LayerGraphs replays them as one
graph per batch shape, the positions padded up to a multiple of SEGMENT_STEPS. Not yet measured on a GPU, so
only with cfg['cuda_graphs'] True; None (the default) graphs the recurrent decoders on a single CUDA GPU (the
rnn decoder's recurrence is cuDNN's already).
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from models import DecoderWithTransformer, RecurrentDecoder

SEGMENT_STEPS = 16  # steps of one graphed segment
MIN_SEGMENT_ROWS = 16  # fewer rows cost a GPU no less time: they are rounded up to this


def segment_rows(running, batch_rows):
    """The rows a segment computes when `running` of the batch's `batch_rows` captions are still running at its
    first step: rounded up to a power of two (so few graphs serve every batch), at least MIN_SEGMENT_ROWS, at most
    the batch."""
    return min(max(MIN_SEGMENT_ROWS, 1 << (running - 1).bit_length()), batch_rows)


def segments(decode_lengths, padded_length):
    """(first step, steps, rows computed, rows running) of each graphed segment of a batch whose decode lengths
    are sorted in decreasing order; a segment's steps end at the captions' padded length (<start> and <end>
    included)."""
    found = []
    for first in range(0, decode_lengths[0], SEGMENT_STEPS):
        running = sum(length > first for length in decode_lengths)
        found.append((first, min(SEGMENT_STEPS, padded_length - first), segment_rows(running, len(decode_lengths)),
                      running))
    return found


class Recurrence(nn.Module):
    """decoder.recur over a fixed number of steps as a module of tensor arguments (what make_graphed_callables
    takes): forward(embeddings, *memory, *state) -> (outputs, attention, *state) or (outputs, *state)."""

    def __init__(self, decoder, steps, memory_count):
        super().__init__()
        self.decoder, self.steps, self.memory_count = decoder, steps, memory_count

    def forward(self, embeddings, *tensors, weights_cast=False):
        device = embeddings.device.type
        if torch.is_autocast_enabled(device) and not weights_cast:
            # Every weight, and the memory the steps' matrix products read, cast once for all the steps: autocast
            # without its cache (as graphs need it) would cast each again at every step.
            dtype = torch.get_autocast_dtype(device)
            weights = {f"decoder.{name}": weight.to(dtype) for name, weight in self.decoder.named_parameters()}
            memory = tuple(m.to(dtype) if m.is_floating_point() else m for m in tensors[:self.memory_count])
            return functional_call(self, weights, (embeddings, *memory, *tensors[self.memory_count:]),
                                   {"weights_cast": True})
        memory, state = tensors[:self.memory_count], tensors[self.memory_count:]
        outputs, alphas, state = self.decoder.recur(embeddings, memory, state, self.steps)
        return (outputs, *state) if alphas is None else (outputs, alphas, *state)


class DecoderLayers(nn.Module):
    """The Transformer's decoder layers over whole captions from their first position, as a module of tensor
    arguments (what make_graphed_callables takes): forward(x, *memory) -> (outputs, attention), as
    decoder.run_layers gives them from an empty cache."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, x, *memory):
        no_words = x.new_zeros(x.size(0), self.decoder.heads, 0, self.decoder.decoder_dim // self.decoder.heads)
        outputs, _, attention = self.decoder.run_layers(x, memory, (no_words,) * len(memory))
        return outputs, attention


class CapturedGraphs:
    """Graphed callables of one decoder by key (their inputs' shapes), each captured the first time it is needed
    (torch.cuda.make_graphed_callables: forward and backward); called as decoder.training_graphs. If a capture
    fails: a warning, the plain module for this batch, and no graphs from the next batch on."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.graphs = {}  # key -> graphed callable
        self.failed = False

    def graphed(self, key, make_module, inputs):
        """The graphed callable for `key`, captured on inputs like `inputs` if it is new."""
        return self.graphs.get(key) or self.capture(key, make_module(), inputs)

    def capture(self, key, module, inputs):
        if self.failed:
            return module
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        try:
            graphed = torch.cuda.make_graphed_callables(module, samples, allow_unused_input=True)
        except RuntimeError as error:
            self.failed = True
            self.decoder.training_graphs = None
            warnings.warn(f"CUDA graphs of the decoder's teacher-forced pass could not be captured ({error}); "
                          f"training goes on without them (set cfg['cuda_graphs'] = False to skip the attempt)")
            return module
        self.graphs[key] = graphed
        return graphed


def input_key(inputs):
    """The shapes, dtypes and requires_grad of a graph's inputs: one graph per distinct key."""
    return tuple((t.shape, t.dtype, t.requires_grad) for t in inputs)


class RecurrenceGraphs(CapturedGraphs):
    """A recurrent decoder's teacher-forced recurrence in graphed segments."""

    def __call__(self, embeddings, memory, state, decode_lengths):
        """(N, L, E) embeddings, memory and state tuples of N rows sorted by decreasing decode length -> step
        outputs (sum of decode lengths, D) and attention (sum, P) or None, time-major as a PackedSequence's data
        (as decoder.recur_running gives them)."""
        outputs, alphas = [], []
        for segment, (first, steps, rows, running) in enumerate(segments(decode_lengths, embeddings.size(1))):
            inputs = (embeddings[:rows, first:first + steps], *(t[:rows] for t in (*memory, *state)))
            graphed = self.graphed((segment, steps, len(memory), input_key(inputs)),
                                   lambda: Recurrence(self.decoder, steps, len(memory)), inputs)
            results = graphed(*inputs)  # (steps, rows, D), (steps, rows, P) if attention, then the state
            state = results[len(results) - len(state):]
            # The positions each running caption needs in this segment, packed time-major.
            lengths = [min(length - first, steps) for length in decode_lengths[:running]]
            outputs.append(pack_padded_sequence(results[0][:, :running], lengths).data)
            if self.decoder.has_attention:
                alphas.append(pack_padded_sequence(results[1][:, :running], lengths).data)
        return torch.cat(outputs), torch.cat(alphas) if alphas else None


class LayerGraphs(CapturedGraphs):
    """The Transformer's teacher-forced decoder layers as graphs, the positions padded up to a multiple of
    SEGMENT_STEPS (a later position never changes an earlier one under the causal mask)."""

    def __call__(self, x, memory):
        """(N, T, D) first-layer inputs and the layers' memory -> outputs (N, T, D) and attention (N, T, P)."""
        steps = x.size(1)
        x = F.pad(x, (0, 0, 0, -(-steps // SEGMENT_STEPS) * SEGMENT_STEPS - steps))  # (N, T rounded up, D)
        inputs = (x, *memory)
        outputs, attention = self.graphed(input_key(inputs), lambda: DecoderLayers(self.decoder), inputs)(*inputs)
        return outputs[:, :steps], attention[:, :steps]


def training_graphs(cfg, decoder, device, distributed):
    """The CUDA graphs the trainer gives `decoder`, or None. cfg['cuda_graphs'] None (the default): on a single
    CUDA GPU for a decoder that steps through its recurrence (the rnn decoder's is cuDNN's already); True: also
    the Transformer's layers (not yet measured on a GPU, so not by default)."""
    if device.type != "cuda" or distributed or cfg["cuda_graphs"] is False or getattr(decoder, "fused_lstm", False):
        return None
    if isinstance(decoder, RecurrentDecoder):
        return RecurrenceGraphs(decoder)
    return LayerGraphs(decoder) if cfg["cuda_graphs"] and isinstance(decoder, DecoderWithTransformer) else None
