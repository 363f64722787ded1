"""The training stages: what one batch contributes to the loss, behind one seam of the training loop.

A stage's `loss(batch)` takes a `Batch` of tensors on the training device and returns the loss to minimise and
the statistics to show, {name: (value, count)}; it knows nothing of the loop around it (optimisers, epochs,
validation, checkpoints, logs: training.py). `make_stage(cfg, ...)` builds the stage cfg['training'] names.

- CrossEntropyStage ("xe"): the course's teacher forcing, cross-entropy over the real positions (smoothed over
  the vocabulary with cfg['label_smoothing']) plus the doubly stochastic attention regularisation for decoders
  that declare it. With scheduled sampling (Bengio et al., NeurIPS 2015; cfg['scheduled_sampling_*']), each
  input word is, with probability p, the model's own sample instead of the reference's (scheduled_sampling_pass).
- SelfCriticalStage ("scst"): self-critical sequence training (Rennie et al., CVPR 2017): sample captions,
  reward each with its CIDEr-D against the image's references (document frequencies of the TRAIN split),
  plus, with cfg['scst_reward'] "cider+clips", cfg['clip_reward_weight'] x its CLIP-S with the image
  (clip_reward.py), and follow the policy gradient against a baseline (the mean of the image's other samples,
  Luo's "new self-critical", or the reward of the greedy caption, the original).
"""
import dataclasses

import torch
import torch.nn.functional as F

from cider import CiderD
from clip_reward import CiderClipReward, ClipReward
from clip_score import load_scorer
from datasets import load_references
from models import lay_out, pack, running_counts, select_rows
from sampling import draw_words, greedy_baseline, greedy_captions, mean_baseline, sample_captions, scst_loss


@dataclasses.dataclass
class Batch:
    """One batch as a stage sees it."""
    encoder_out: torch.Tensor  # (B, P, C) encodings, on the training device
    captions: torch.Tensor  # (B, cpi, L) all the captions of each image, or (B, L) one each; on the device
    lengths: torch.Tensor  # (B, cpi) or (B, 1) lengths of the captions; on the device
    image_index: torch.Tensor | None = None  # (B,) each image's index in its split, on the CPU (SCST's references)


def caption_loss(scores, targets, decode_lengths, alphas, alpha_c, regularize_attention, label_smoothing=0.0):
    """Cross-entropy over the real (unpadded) positions (with label_smoothing eps: (1 - eps) x NLL + eps x the
    mean over the vocabulary of -log p) plus doubly stochastic attention regularisation.

    Returns the loss and the packed scores (K, V) and targets (K,) of the real positions.
    """
    running = running_counts(decode_lengths)
    scores = pack(scores, running).float()  # (K, V)
    targets = pack(targets, running)  # (K,)
    loss = F.cross_entropy(scores, targets, label_smoothing=label_smoothing)
    if regularize_attention and alpha_c:
        loss = loss + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    return loss, scores, targets


def top5_accuracy(scores, targets):
    """Percentage of positions whose target is among the 5 highest scores (a 0-d tensor)."""
    k = min(5, scores.size(1))
    correct = scores.topk(k, dim=1).indices.eq(targets.unsqueeze(1)).any(dim=1)
    return correct.float().mean() * 100.0


def flatten_captions(captions, lengths):
    """Grouped captions (B, cpi, L) -> (B * cpi, L) with the image index of each; per-caption ones as they are."""
    if captions.dim() == 3:
        per_image = captions.size(1)
        caption_image = torch.arange(captions.size(0), device=captions.device).repeat_interleave(per_image)
        return captions.reshape(-1, captions.size(2)), lengths.reshape(-1), caption_image
    return captions, lengths, None


def scheduled_sampling_probability(cfg, epoch):
    """Scheduled sampling's p at `epoch`, self-critical.pytorch's formula: 0 before cfg['scheduled_sampling_start']
    (and always when it is -1), then min(increase_prob x ((epoch - start) // increase_every), max_prob)."""
    start = cfg["scheduled_sampling_start"]
    if start < 0 or epoch < start:
        return 0.0
    increases = (epoch - start) // cfg["scheduled_sampling_increase_every"]
    return float(min(cfg["scheduled_sampling_increase_prob"] * increases, cfg["scheduled_sampling_max_prob"]))


def mixed_inputs(reference, previous_scores, probability, generator=None):
    """One position's input words (N,): each caption's reference word (N,), replaced with `probability` by a word
    drawn from its scores at the previous position (N, V), detached: no gradient flows through the choice."""
    sampled = torch.rand(len(reference), generator=generator, device=reference.device) < probability  # (N,)
    drawn = draw_words(F.log_softmax(previous_scores.detach(), dim=1), generator)  # (N,)
    return torch.where(sampled, drawn, reference)


def scheduled_sampling_pass(decoder, encoder_out, captions, lengths, caption_image, probability, generator=None):
    """The teacher-forced pass with scheduled sampling, one position at a time through the decoder's start and
    one_step (every decoder has them): after <start>, each caption's input word is, with `probability`, a word
    drawn from the decoder's own distribution at the previous position, else the reference's.

    Arguments and returns as the decoder's forward: scores (N, T, V) sorted by decreasing length, the sorted
    captions, decode lengths, alphas (N, T, P or P + 1) or None, the sort order. `generator`: a torch.Generator
    on the device, for repeatable draws (None: the global one).
    """
    memory, state, captions, decode_lengths, sort_ind = decoder.start_captions(encoder_out, captions, lengths,
                                                                               caption_image)
    running = running_counts(decode_lengths)
    step_scores, step_alphas = [], []
    for t, rows in enumerate(running):  # the first `rows` captions run at position t
        if t == 0:
            words = captions[:rows, 0]  # (rows,) <start>
        else:
            words = mixed_inputs(captions[:rows, t], step_scores[-1][:rows], probability, generator)
        scores, state, alpha = decoder.one_step(decoder.embedding(words), select_rows(memory, slice(0, rows)),
                                                select_rows(state, slice(0, rows)))
        step_scores.append(scores)  # (rows, V)
        step_alphas.append(alpha)  # (rows, P) or None
    alphas = None if step_alphas[0] is None else lay_out(torch.cat(step_alphas), running)
    return lay_out(torch.cat(step_scores), running), captions, decode_lengths, alphas, sort_ind


class TeacherForced:
    """The teacher-forced pass of a batch: what both the cross-entropy stage and validation need (validation's
    loss is the plain cross-entropy: label_smoothing 0). With sampling_probability > 0, scheduled sampling
    (scheduled_sampling_pass, through `decoder`'s start/one_step); else the decoder's forward."""

    def __init__(self, decoder, batch, alpha_c, regularize_attention, label_smoothing=0.0, sampling_probability=0.0):
        captions, lengths, self.caption_image = flatten_captions(batch.captions, batch.lengths)
        if sampling_probability > 0:
            decoded = scheduled_sampling_pass(decoder, batch.encoder_out, captions, lengths, self.caption_image,
                                              sampling_probability)
        else:
            decoded = decoder(batch.encoder_out, captions, lengths, self.caption_image)
        scores, captions_sorted, self.decode_lengths, alphas, self.sort_ind = decoded
        self.loss, self.packed_scores, self.targets = caption_loss(
            scores, captions_sorted[:, 1:], self.decode_lengths, alphas, alpha_c, regularize_attention,
            label_smoothing)
        self.scores = scores  # (N, T, V), sorted by decreasing length

    def image_of_caption(self):
        """(N,) the image index (in the batch) of each sorted caption."""
        return self.caption_image[self.sort_ind] if self.caption_image is not None else self.sort_ind


class CrossEntropyStage:
    """The course's training step: teacher forcing (with scheduled sampling when sampling_probability > 0) and
    cross-entropy."""

    name = "xe"
    needs_image_index = False
    checks_divergence = True  # a loss far above its first value means training diverged

    def __init__(self, decoder, decoder_module, alpha_c, regularize_attention, label_smoothing=0.0):
        self.decoder, self.decoder_module = decoder, decoder_module  # as make_stage's
        self.alpha_c, self.regularize_attention, self.label_smoothing = alpha_c, regularize_attention, label_smoothing
        self.sampling_probability = 0.0  # scheduled sampling's p, set by the trainer at each epoch; 0: none

    @property
    def decodes_unwrapped(self):
        """Teacher forcing goes through the decoder's forward (DDP's wrapper all-reduces its gradients); scheduled
        sampling steps through the decoder itself, whose gradients are then all-reduced by hand."""
        return self.sampling_probability > 0

    def teacher_forced(self, batch):
        decoder = self.decoder_module if self.decodes_unwrapped else self.decoder
        return TeacherForced(decoder, batch, self.alpha_c, self.regularize_attention, self.label_smoothing,
                             self.sampling_probability)

    def loss(self, batch):
        """(loss to minimise, {statistic: (value, count)}) of one training batch."""
        forced = self.teacher_forced(batch)
        count = forced.targets.numel()
        return forced.loss, {"loss": (forced.loss.detach(), count),
                             "top5": (top5_accuracy(forced.packed_scores.detach(), forced.targets), count)}


def encoded_references(data_folder, data_name, split, word_map):
    """Per image of a split, in HDF5 order, its reference sentences as word ids (unknown words: <unk>)."""
    unknown = word_map["<unk>"]
    references = load_references(data_folder, data_name, split, word_map).references
    return [[[word_map.get(token, unknown) for token in sentence] for sentence in image] for image in references]


class SelfCriticalStage:
    """The SCST step: sampled captions, their rewards (CIDEr-D, or CIDEr-D + w x CLIP-S), and the policy gradient
    against a baseline."""

    name = "scst"
    needs_image_index = True  # the loader gives each image's TRAIN index: its references in the reward
    decodes_unwrapped = True  # samples through the plain decoder: under DDP its gradients are all-reduced by hand
    checks_divergence = False  # the policy-gradient loss has no scale to compare with

    def __init__(self, decoder, reward, start, end, samples_per_image, baseline, max_steps):
        self.decoder, self.reward = decoder, reward  # the decoder itself (start/one_step), make_reward's
        self.start, self.end = start, end
        self.samples_per_image, self.baseline, self.max_steps = samples_per_image, baseline, max_steps

    def loss(self, batch):
        """(minus the advantage-weighted log-probability of the sampled words, {statistic: (value, count)})."""
        samples = sample_captions(self.decoder, batch.encoder_out, self.samples_per_image, self.start, self.end,
                                  self.max_steps)
        sampled_images = batch.image_index.repeat_interleave(self.samples_per_image)  # (B * n,)
        rewards = self.reward.scores(samples.captions(self.end), sampled_images).reshape(-1, self.samples_per_image)
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=batch.encoder_out.device)  # (B, n)
        baselines = self.baselines(batch, rewards)
        loss = scst_loss(samples.log_probs.float(), samples.mask, rewards, baselines)
        count = rewards.numel()
        return loss, {"loss": (loss.detach(), count), "reward": (rewards.mean(), count),
                      "baseline": (baselines.mean(), count)}

    def baselines(self, batch, rewards):
        """(B, n) baselines: the mean of the other samples' rewards, or the greedy caption's reward (decoded in
        eval mode, as at test time)."""
        if self.baseline == "mean":
            return mean_baseline(rewards)
        self.decoder.eval()
        try:
            greedy = greedy_captions(self.decoder, batch.encoder_out.detach(), self.start, self.end, self.max_steps)
        finally:
            self.decoder.train()
        greedy_rewards = self.reward.scores(greedy.captions(self.end), batch.image_index)
        return greedy_baseline(torch.as_tensor(greedy_rewards, dtype=torch.float32, device=rewards.device),
                               rewards.size(1))


STAGES = {"xe": CrossEntropyStage, "scst": SelfCriticalStage}


def make_reward(cfg, word_map, device, quiet=False):
    """SCST's reward of cfg['scst_reward']: CIDEr-D with the TRAIN references, plus, for "cider+clips",
    cfg['clip_reward_weight'] x CLIP-S by cfg['clip_reward_model'] (loaded on `device`, the TRAIN images embedded
    once; `quiet`: without a progress bar)."""
    cider = CiderD(encoded_references(cfg["data_folder"], cfg["data_name"], "TRAIN", word_map),
                   vocab_size=len(word_map))
    if cfg["scst_reward"] == "cider":
        return cider
    scorer = load_scorer(cfg["clip_reward_model"], device, key="clip_reward_model")
    clip = ClipReward.from_split(scorer, cfg["data_folder"], cfg["data_name"], word_map, quiet=quiet)
    return CiderClipReward(cider, clip, cfg["clip_reward_weight"])


def make_stage(cfg, decoder, decoder_module, word_map, quiet=False):
    """The stage cfg['training'] names. `decoder`: what the teacher-forced pass calls (DDP's wrapper in a
    multi-process run); `decoder_module`: the decoder itself; `quiet`: no progress bar (ranks other than 0)."""
    if cfg["training"] == "xe":
        if cfg["label_smoothing"]:
            print(f"note: label_smoothing = {cfg['label_smoothing']}: the training loss shown and logged (loss, "
                  f"train/loss, train_loss) is the smoothed cross-entropy; validation's (LOSS, val_loss) stays the "
                  f"plain one")
        return CrossEntropyStage(decoder, decoder_module, cfg["alpha_c"], decoder_module.attention_regularization,
                                 cfg["label_smoothing"])
    reward = make_reward(cfg, word_map, next(decoder_module.parameters()).device, quiet)
    return SelfCriticalStage(decoder_module, reward, word_map["<start>"], word_map["<end>"], cfg["scst_samples"],
                             cfg["scst_baseline"], cfg["max_steps"])
