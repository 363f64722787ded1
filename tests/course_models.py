"""The course's models.py as its case study fills it in (layer names and shapes as the seed gives them), its
train.py's way of saving a checkpoint, and a beam search written the course's way on the course's one_step.

The tests build course checkpoints with these, to check that course_import turns them into checkpoints of
this toolkit that caption exactly like the course's own modules.
"""
import contextlib
import sys
import types

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision import transforms

# The course's datasets normalise images / 255 with ImageNet's mean and std.
COURSE_NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


class Encoder(nn.Module):
    """ResNet-101 without its pooling and classifier, then an adaptive pool (the course's; weights=None here)."""

    def __init__(self, encoded_image_size=14):
        super().__init__()
        self.enc_image_size = encoded_image_size
        resnet = torchvision.models.resnet101(weights=None)
        self.resnet = nn.Sequential(*list(resnet.children())[:-2])
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))

    def forward(self, images):
        out = self.adaptive_pool(self.resnet(images))  # (B, 2048, G, G)
        return out.permute(0, 2, 3, 1)  # (B, G, G, 2048)


class DecoderWithRNN(nn.Module):
    """The course's decoder without attention: the flattened G x G x C encoding, through init and bn, is the
    LSTMCell's first input."""

    def __init__(self, cfg, encoder_dim=14 * 14 * 2048):
        super().__init__()
        self.encoder_dim = encoder_dim
        self.decoder_dim = cfg["decoder_dim"]
        self.embed_dim = cfg["embed_dim"]
        self.vocab_size = cfg["vocab_size"]
        self.dropout = cfg["dropout"]
        self.device = cfg["device"]
        self.embedding = nn.Embedding(self.vocab_size, self.embed_dim)
        self.decode_step = nn.LSTMCell(self.decoder_dim, self.decoder_dim)
        self.init = nn.Linear(self.encoder_dim, self.decoder_dim)
        self.bn = nn.BatchNorm1d(self.decoder_dim)
        self.fc = nn.Linear(self.decoder_dim, self.vocab_size)
        self.dropout = nn.Dropout(self.dropout)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def start(self, encoder_out):
        """(B, G, G, C) -> the LSTM state after reading the image (the course's forward's initialisation)."""
        init_input = self.bn(self.init(encoder_out.reshape(encoder_out.size(0), -1)))
        return self.decode_step(init_input)

    def one_step(self, embeddings, h, c):
        h, c = self.decode_step(embeddings, (h, c))
        preds = self.fc(self.dropout(h))
        return preds, h, c


class Attention(nn.Module):
    """The course's attention; its layer names are this toolkit's (models.Attention), which the import relies on."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.att = nn.Linear(attention_dim, 1)

    def forward(self, encoder_out, decoder_hidden):
        att1 = self.encoder_att(encoder_out)  # (B, P, A)
        att2 = self.decoder_att(decoder_hidden).unsqueeze(1)  # (B, 1, A)
        e = self.att(F.relu(att1 + att2))  # (B, P, 1)
        alpha = F.softmax(e, dim=1)
        z = (encoder_out * alpha).sum(dim=1)  # (B, C)
        return z, alpha


class DecoderWithAttention(nn.Module):
    def __init__(self, cfg, encoder_dim=2048):
        super().__init__()
        self.encoder_dim = encoder_dim
        self.decoder_dim = cfg["decoder_dim"]
        self.attention_dim = cfg["attention_dim"]
        self.embed_dim = cfg["embed_dim"]
        self.vocab_size = cfg["vocab_size"]
        self.dropout = cfg["dropout"]
        self.device = cfg["device"]
        self.attention = Attention(encoder_dim, self.decoder_dim, self.attention_dim)
        self.embedding = nn.Embedding(self.vocab_size, self.embed_dim)
        self.decode_step = nn.LSTMCell(self.embed_dim + self.encoder_dim, self.decoder_dim)
        self.init_h = nn.Linear(self.encoder_dim, self.decoder_dim)
        self.init_c = nn.Linear(self.encoder_dim, self.decoder_dim)
        self.f_beta = nn.Linear(self.decoder_dim, self.encoder_dim)
        self.beta = nn.Sigmoid()
        self.fc = nn.Linear(self.decoder_dim, self.vocab_size)
        self.dropout = nn.Dropout(p=self.dropout)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def start(self, encoder_out):
        """(B, P, C) -> h, c from the mean encoding (the course's forward's initialisation)."""
        mean_encoder_out = encoder_out.mean(dim=1)
        return self.init_h(mean_encoder_out), self.init_c(mean_encoder_out)

    def one_step(self, embeddings, encoder_out, h, c):
        z, alpha = self.attention(encoder_out, h)
        beta = self.beta(self.f_beta(h))
        z = beta * z
        h, c = self.decode_step(torch.cat([embeddings, z], dim=1), (h, c))
        preds = self.fc(self.dropout(h))
        return preds, alpha, h, c


COURSE_CLASSES = (Encoder, DecoderWithRNN, Attention, DecoderWithAttention)
for _cls in COURSE_CLASSES:
    _cls.__module__ = "models"  # as pickled by the course, whose classes live in its models.py


@contextlib.contextmanager
def course_models_importable():
    """`models` is the course's models.py for the duration (pickle checks that it finds the classes it saves)."""
    saved = sys.modules.get("models")
    course = types.ModuleType("models")
    for cls in COURSE_CLASSES:
        setattr(course, cls.__name__, cls)
    sys.modules["models"] = course
    try:
        yield
    finally:
        if saved is None:
            del sys.modules["models"]
        else:
            sys.modules["models"] = saved


def save_course_checkpoint(path, encoder, decoder, epoch, epochs_since_improvement, bleu4, decoder_optimizer,
                           encoder_optimizer=None):
    """The course train.py's save_checkpoint: the whole modules and optimisers, pickled."""
    state = {"epoch": epoch, "epochs_since_improvement": epochs_since_improvement, "bleu-4": bleu4,
             "encoder": encoder, "decoder": decoder, "encoder_optimizer": encoder_optimizer,
             "decoder_optimizer": decoder_optimizer}
    with course_models_importable():
        torch.save(state, path)


def randomize_batchnorm_statistics(module, generator):
    """Running statistics away from their defaults, so that a lost or swapped BatchNorm buffer shows."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
            layer.num_batches_tracked.fill_(7)


@torch.no_grad()
def course_beam_search(decoder, encoder_out, start_id, end_id, beam_size, max_steps):
    """Beam search for one image's (1, G, G, C) encoding on the course's decoder: k beams, the first step from
    one beam, a beam that emits <end> is complete and k shrinks; the best complete caption (the earliest on a
    tie), or the best running beam after max_steps. Returns the word ids from <start> on."""
    k = beam_size
    attention = isinstance(decoder, DecoderWithAttention)
    if attention:
        encoder_out = encoder_out.reshape(1, -1, encoder_out.size(-1)).expand(k, -1, -1)  # (k, P, C)
        h, c = decoder.start(encoder_out)
    else:
        h, c = decoder.start(encoder_out.expand(k, -1, -1, -1))
    seqs = torch.full((k, 1), start_id, dtype=torch.long)
    scores = torch.zeros(k)
    complete = []  # (score, words)
    for step in range(1, max_steps + 1):
        embeddings = decoder.embedding(seqs[:, -1])
        if attention:
            preds, _, h, c = decoder.one_step(embeddings, encoder_out[:len(seqs)], h, c)
        else:
            preds, h, c = decoder.one_step(embeddings, h, c)
        candidates = scores.unsqueeze(1) + F.log_softmax(preds, dim=1)  # (k, V)
        vocab_size = candidates.size(1)
        flat = candidates[0] if step == 1 else candidates.reshape(-1)
        scores, best = flat.topk(k)
        beam, word = best // vocab_size, best % vocab_size
        seqs = torch.cat([seqs[beam], word.unsqueeze(1)], dim=1)
        h, c = h[beam], c[beam]
        ended = word == end_id
        complete += [(scores[i].item(), seqs[i].tolist()) for i in range(k) if ended[i]]
        k -= int(ended.sum())
        if k == 0:
            break
        running = ~ended
        seqs, scores, h, c = seqs[running], scores[running], h[running], c[running]
    if not complete:
        return seqs[0].tolist()
    best_score = max(score for score, _ in complete)
    return next(words for score, words in complete if score == best_score)
