"""One training step per training stage, behind one seam of the training loop (training.Trainer).

A stage turns a batch from the loader into a loss to minimise and the statistics to show; the loop
around it (optimisers, clipping, validation, checkpoints, early stopping, learning rates, progress bars
and logs) is the same for every stage. STAGES maps cfg['training'] to the stage's class.

- CrossEntropyStage ("xe"): the course's teacher forcing, cross-entropy over the real positions plus the
  doubly stochastic attention regularisation for decoders that declare it.
- SelfCriticalStage ("scst"): self-critical sequence training (Rennie et al., CVPR 2017): sample captions,
  reward each with its CIDEr-D against the image's references (document frequencies of the TRAIN split),
  and follow the policy gradient against a baseline (the mean of the image's other samples, Luo's "new
  self-critical", or the reward of the greedy caption, the original).
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from cider import CiderD
from datasets import load_references
from sampling import greedy_baseline, greedy_captions, mean_baseline, sample_captions, scst_loss
from utils import ToolkitError

DIVERGENCE_FACTOR = 10.0  # a cross-entropy this many times its first value means training diverged


def caption_loss(scores, targets, decode_lengths, alphas, alpha_c, regularize_attention):
    """Cross-entropy over the real (unpadded) positions plus doubly stochastic attention regularisation.

    Returns the loss and the packed scores (K, V) and targets (K,) of the real positions.
    """
    scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
    targets = pack_padded_sequence(targets, decode_lengths, batch_first=True).data
    loss = F.cross_entropy(scores, targets)
    if regularize_attention and alpha_c:
        loss = loss + alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    return loss, scores, targets


def top5_accuracy(scores, targets):
    """Percentage of positions whose target is among the 5 highest scores."""
    k = min(5, scores.size(1))
    correct = scores.topk(k, dim=1).indices.eq(targets.unsqueeze(1)).any(dim=1)
    return correct.float().mean().item() * 100.0


def flatten_captions(captions, lengths, device):
    """Grouped captions (B, cpi, L) -> (B * cpi, L) with the image index of each; per-caption ones as they are."""
    if captions.dim() == 3:
        per_image = captions.size(1)
        caption_image = torch.arange(captions.size(0), device=device).repeat_interleave(per_image)
        return captions.reshape(-1, captions.size(2)), lengths.reshape(-1), caption_image
    return captions, lengths, None


class TeacherForced:
    """The teacher-forced pass of a batch: what both the cross-entropy step and validation need."""

    def __init__(self, trainer, batch):
        inputs, captions, lengths = batch[:3]
        captions, lengths = captions.to(trainer.device), lengths.to(trainer.device)
        with trainer.autocast():
            encoder_out = trainer.encode(inputs)  # (B, P, C)
            captions, lengths, self.caption_image = flatten_captions(captions, lengths, trainer.device)
            scores, captions_sorted, self.decode_lengths, alphas, self.sort_ind = trainer.decoder(
                encoder_out, captions, lengths, self.caption_image)
            self.loss, self.packed_scores, self.targets = caption_loss(
                scores.float(), captions_sorted[:, 1:], self.decode_lengths, alphas, trainer.cfg["alpha_c"],
                trainer.decoder_module.attention_regularization)
        self.scores = scores  # (N, T, V), sorted by decreasing length

    def image_of_caption(self):
        """(N,) the image index (in the batch) of each sorted caption."""
        return self.caption_image[self.sort_ind] if self.caption_image is not None else self.sort_ind


class CrossEntropyStage:
    """The course's training step: teacher forcing and cross-entropy."""

    name = "xe"

    def __init__(self, trainer):
        self.trainer = trainer

    def loss(self, batch):
        """(loss to minimise, {statistic: (value, weight)}) of one training batch."""
        forced = TeacherForced(self.trainer, batch)
        count = forced.targets.numel()
        self.check_divergence(forced.loss.item())
        return forced.loss, {"loss": (forced.loss.item(), count),
                             "top5": (top5_accuracy(forced.packed_scores.detach(), forced.targets), count)}

    def check_divergence(self, loss):
        """Stop when the cross-entropy explodes far above its first value (a finite divergence, e.g. a
        learning rate far too high): such an epoch must never be saved, let alone marked best."""
        state = self.trainer.state
        if state.get("reference_loss") is None:
            state["reference_loss"] = loss
            return
        reference = state["reference_loss"]
        if loss > DIVERGENCE_FACTOR * reference and loss > reference + 5:
            raise ToolkitError(
                f"training diverged: the loss is {loss:.4g}, more than {DIVERGENCE_FACTOR:g} times its first "
                f"value {reference:.4g}; stopped before saving this epoch (the last good checkpoint "
                f"{self.trainer.paths.last!r}, if any, is untouched). Lower decoder_lr/encoder_lr (now "
                f"{self.trainer.cfg['decoder_lr']:g}/{self.trainer.cfg['encoder_lr']:g}) or set grad_clip")


def encoded_references(data_folder, data_name, split, word_map):
    """Per image of a split, in HDF5 order, its reference sentences as word ids (unknown words: <unk>)."""
    unknown = word_map["<unk>"]
    references = load_references(data_folder, data_name, split, word_map).references
    return [[[word_map.get(token, unknown) for token in sentence] for sentence in image] for image in references]


class SelfCriticalStage:
    """The SCST step: sampled captions, their CIDEr-D rewards, and the policy gradient against a baseline."""

    name = "scst"
    needs_image_index = True  # the loader gives each image's TRAIN index: its references in the reward
    decodes_unwrapped = True  # samples through the plain decoder: under DDP the trainer all-reduces its gradients

    def __init__(self, trainer):
        self.trainer = trainer
        cfg = trainer.cfg
        corpus = encoded_references(cfg["data_folder"], cfg["data_name"], "TRAIN", trainer.word_map)
        self.reward = CiderD(corpus, vocab_size=len(trainer.word_map))
        self.start, self.end = trainer.word_map["<start>"], trainer.word_map["<end>"]

    def loss(self, batch):
        """(minus the advantage-weighted log-probability of the sampled words, {statistic: (value, weight)})."""
        trainer, cfg = self.trainer, self.trainer.cfg
        inputs, image_index = batch[0], batch[-1]
        samples_per_image = cfg["scst_samples"]
        with trainer.autocast():
            encoder_out = trainer.encode(inputs)  # (B, P, C)
            samples = sample_captions(trainer.decoder_module, encoder_out, samples_per_image, self.start, self.end,
                                      cfg["max_steps"])
        sampled_images = image_index.repeat_interleave(samples_per_image)  # (B * n,)
        rewards = self.reward.scores(samples.captions(self.end), sampled_images).reshape(-1, samples_per_image)
        rewards = torch.as_tensor(rewards, dtype=torch.float32, device=trainer.device)  # (B, n)
        baselines = self.baselines(encoder_out, rewards, image_index)
        loss = scst_loss(samples.log_probs.float(), samples.mask, rewards, baselines)
        count = rewards.numel()
        return loss, {"loss": (loss.item(), count), "reward": (rewards.mean().item(), count),
                      "baseline": (baselines.mean().item(), count)}

    def baselines(self, encoder_out, rewards, image_index):
        """(B, n) baselines: the mean of the other samples' rewards, or the greedy caption's reward (decoded in
        eval mode, as at test time)."""
        if self.trainer.cfg["scst_baseline"] == "mean":
            return mean_baseline(rewards)
        decoder = self.trainer.decoder_module
        decoder.eval()
        try:
            greedy = greedy_captions(decoder, encoder_out.detach(), self.start, self.end, self.trainer.cfg["max_steps"])
        finally:
            decoder.train()
        greedy_rewards = self.reward.scores(greedy.captions(self.end), image_index)
        return greedy_baseline(torch.as_tensor(greedy_rewards, dtype=torch.float32, device=rewards.device),
                               rewards.size(1))


STAGES = {"xe": CrossEntropyStage, "scst": SelfCriticalStage}
