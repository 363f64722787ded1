"""The teacher-forced recurrence of a training step replayed as CUDA graphs (a GPU's launch overhead removed).

Step by step, a recurrent decoder launches a few dozen small kernels per word position, forward and backward:
on a GPU the step is then bound by the Python that launches them, not by the GPU. A CUDA graph records those
launches once and replays them as one. A graph has fixed shapes, so the graphed recurrence runs every caption
of the batch through a fixed number of steps (models.RecurrentDecoder.recur; positions past a caption's end
are computed and never read), the number of steps rounded up to a multiple of STEP_BUCKET: a few graphs per
batch size (an epoch's shorter last batch has its own), each captured the first time it is needed
(torch.cuda.make_graphed_callables: forward and backward). Evaluation runs the plain step-by-step loop.

Autocast must run without its weight-cast cache under graphs, and it casts activations at every use: so under
autocast the recurrence casts the weights, and the memory that start() gives and the steps' matrix products
read, once for all the steps. The trainer turns graphs on for cfg['cuda_graphs'] (None: on a single CUDA GPU
for decoders with a step-by-step recurrence; the rnn decoder's is cuDNN's already).
"""
import warnings

import torch
from torch import nn
from torch.func import functional_call

STEP_BUCKET = 16  # graphs are captured for 16, 32, 48, ... steps


def graphed_steps(steps, padded_length):
    """The steps a graph runs for a batch whose longest caption needs `steps`: rounded up to STEP_BUCKET, at most
    the captions' padded length."""
    return min(-(-steps // STEP_BUCKET) * STEP_BUCKET, padded_length)


class Recurrence(nn.Module):
    """decoder.recur over a fixed number of steps as a module of tensor arguments (what make_graphed_callables
    takes): forward(embeddings, *memory, *state) -> (outputs, attention) or (outputs,)."""

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
        outputs, alphas = self.decoder.recur(embeddings, memory, state, self.steps)
        return (outputs,) if alphas is None else (outputs, alphas)


class RecurrenceGraphs:
    """The graphed recurrences of one decoder, by batch shape; called as decoder.recurrence_graphs."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.graphs = {}  # (steps, shapes, dtypes and requires_grad of the inputs) -> graphed callable

    def __call__(self, embeddings, memory, state, steps):
        """(N, L, E) embeddings, memory and state tuples -> step outputs (steps, N, D) and attention (steps, N,
        P) or None, as decoder.recur gives them."""
        bucket = graphed_steps(steps, embeddings.size(1))
        inputs = (embeddings, *memory, *state)
        key = (bucket, len(memory), tuple((t.shape, t.dtype, t.requires_grad) for t in inputs))
        graphed = self.graphs.get(key) or self.capture(key, bucket, inputs, len(memory))
        if graphed is None:
            return self.decoder.recur(embeddings, memory, state, steps)
        outputs = graphed(*inputs)
        return outputs[0][:steps], outputs[1][:steps] if len(outputs) == 2 else None

    def capture(self, key, steps, inputs, memory_count):
        """Record the graphs of the forward and backward pass for inputs like `inputs`. If the capture fails: None,
        and the decoder leaves graphs for its step-by-step loop from the next batch on."""
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        try:
            graphed = torch.cuda.make_graphed_callables(Recurrence(self.decoder, steps, memory_count), samples,
                                                        allow_unused_input=True)
        except RuntimeError as error:
            self.decoder.recurrence_graphs = None
            warnings.warn(f"CUDA graphs of the decoder's recurrence could not be captured ({error}); training "
                          f"goes on step by step (set cfg['cuda_graphs'] = False to skip the attempt)")
            return None
        self.graphs[key] = graphed
        return graphed


def wants_graphs(cfg, decoder, device, distributed):
    """Whether the trainer graphs `decoder`'s recurrence: cfg['cuda_graphs'], where None means on a single
    CUDA GPU for a decoder whose teacher-forced pass steps through its recurrence."""
    possible = device.type == "cuda" and not distributed and hasattr(decoder, "recur") and \
        not getattr(decoder, "fused_lstm", False)
    return possible if cfg["cuda_graphs"] is None else cfg["cuda_graphs"] and possible
