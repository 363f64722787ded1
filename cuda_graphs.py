"""The teacher-forced recurrence of a training step replayed as CUDA graphs (a GPU's launch overhead removed).

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
read, once for each segment. The trainer turns graphs on for cfg['cuda_graphs'] (None: on a single CUDA GPU
for decoders with a step-by-step recurrence; the rnn decoder's is cuDNN's already).
"""
import warnings

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

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


class RecurrenceGraphs:
    """The graphed recurrences of one decoder, by segment and shape; called as decoder.recurrence_graphs."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.graphs = {}  # (segment, steps, shapes, dtypes and requires_grad of the inputs) -> graphed callable
        self.failed = False

    def __call__(self, embeddings, memory, state, decode_lengths):
        """(N, L, E) embeddings, memory and state tuples of N rows sorted by decreasing decode length -> step
        outputs (sum of decode lengths, D) and attention (sum, P) or None, time-major as a PackedSequence's data
        (as decoder.recur_running gives them)."""
        outputs, alphas = [], []
        for segment, (first, steps, rows, running) in enumerate(segments(decode_lengths, embeddings.size(1))):
            inputs = (embeddings[:rows, first:first + steps], *(t[:rows] for t in (*memory, *state)))
            key = (segment, steps, len(memory), tuple((t.shape, t.dtype, t.requires_grad) for t in inputs))
            graphed = self.graphs.get(key) or self.capture(key, steps, inputs, len(memory))
            results = graphed(*inputs)  # (steps, rows, D), (steps, rows, P) if attention, then the state
            state = results[len(results) - len(state):]
            # The positions each running caption needs in this segment, packed time-major.
            lengths = [min(length - first, steps) for length in decode_lengths[:running]]
            outputs.append(pack_padded_sequence(results[0][:, :running], lengths).data)
            if self.decoder.has_attention:
                alphas.append(pack_padded_sequence(results[1][:, :running], lengths).data)
        return torch.cat(outputs), torch.cat(alphas) if alphas else None

    def capture(self, key, steps, inputs, memory_count):
        """Record the graphs of the forward and backward pass for inputs like `inputs`. If the capture fails: the
        plain recurrence for this batch, and the decoder leaves graphs for its step-by-step loop from the next
        batch on."""
        recurrence = Recurrence(self.decoder, steps, memory_count)
        if self.failed:
            return recurrence
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        try:
            graphed = torch.cuda.make_graphed_callables(recurrence, samples, allow_unused_input=True)
        except RuntimeError as error:
            self.failed = True
            self.decoder.recurrence_graphs = None
            warnings.warn(f"CUDA graphs of the decoder's recurrence could not be captured ({error}); training "
                          f"goes on step by step (set cfg['cuda_graphs'] = False to skip the attempt)")
            return recurrence
        self.graphs[key] = graphed
        return graphed


def wants_graphs(cfg, decoder, device, distributed):
    """Whether the trainer graphs `decoder`'s recurrence: cfg['cuda_graphs'], where None means on a single
    CUDA GPU for a decoder whose teacher-forced pass steps through its recurrence."""
    possible = device.type == "cuda" and not distributed and hasattr(decoder, "recur") and \
        not getattr(decoder, "fused_lstm", False)
    return possible if cfg["cuda_graphs"] is None else cfg["cuda_graphs"] and possible
