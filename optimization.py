"""The optimisers of a run and what changes their learning rates: Adam for the decoder and, when it is
fine-tuned, for the encoder; the gradient step (mixed-precision scaling, clipping), the linear warm-up, the
course's decay, and a changed cfg rate on resume."""
import torch


def make_optimizer(parameters, lr):
    """Adam over the trained parameters, fused (one kernel per step for all of them, its step counts on the
    parameters' device: no host synchronisation); None when nothing is trained."""
    parameters = [p for p in parameters if p.requires_grad]
    return torch.optim.Adam(parameters, lr=lr, fused=True) if parameters else None


class Optimizers:
    """The decoder's optimiser and the encoder's (None when the encoder is frozen), stepped together."""

    def __init__(self, decoder, encoder, decoder_lr, encoder_lr, grad_clip, warmup_steps, scaler):
        self.decoder = make_optimizer(decoder.parameters(), decoder_lr)
        self.encoder = make_optimizer(encoder.parameters(), encoder_lr) if encoder is not None else None
        self.grad_clip, self.warmup_steps, self.scaler = grad_clip, warmup_steps, scaler

    @property
    def active(self):
        return [optimizer for optimizer in (self.decoder, self.encoder) if optimizer is not None]

    @property
    def lr(self):
        """The decoder's learning rate now."""
        return self.decoder.param_groups[0]["lr"]

    def step(self, loss, step, after_backward=None):
        """Backward pass of `loss`, `after_backward()` (a gradient all-reduce DDP did not do), clipping, and one
        step of every optimiser at the warmed-up learning rate of optimiser step `step` (0-based)."""
        self.warm_up(step)
        for optimizer in self.active:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if after_backward is not None:
            after_backward()
        if self.grad_clip is not None:
            for optimizer in self.active:
                self.scaler.unscale_(optimizer)
                for group in optimizer.param_groups:
                    torch.nn.utils.clip_grad_value_(group["params"], self.grad_clip)
        for optimizer in self.active:
            self.scaler.step(optimizer)
        self.scaler.update()

    def warm_up(self, step):
        """During the first `warmup_steps` steps the learning rates rise linearly to their values."""
        if step >= self.warmup_steps:
            return
        for optimizer in self.active:
            for group in optimizer.param_groups:
                group.setdefault("target_lr", group["lr"])
                group["lr"] = group["target_lr"] * min(1.0, (step + 1) / self.warmup_steps)

    def decay(self, factor):
        """Multiply every learning rate (the course's adjust_learning_rate)."""
        for optimizer in self.active:
            scale_rates(optimizer, factor)
        print(f"The new learning rate is {self.lr:.6g}")

    def state_dicts(self):
        """{"decoder_optimizer", "encoder_optimizer"} as a checkpoint holds them."""
        return {"decoder_optimizer": self.decoder.state_dict(),
                "encoder_optimizer": None if self.encoder is None else self.encoder.state_dict()}

    def restore(self, checkpoint, rates):
        """The optimiser states of a resumed checkpoint. `rates` {"decoder": (cfg key, saved rate, cfg rate),
        "encoder": ...}: a rate changed in the cfg since the checkpoint applies, keeping the decays so far."""
        if checkpoint["decoder_optimizer"] is None:
            print("note: the checkpoint holds no optimiser state (an imported model): the optimisers start afresh")
            return
        pairs = [(self.decoder, checkpoint["decoder_optimizer"], "decoder"),
                 (self.encoder, checkpoint.get("encoder_optimizer"), "encoder")]
        for optimizer, state, part in pairs:
            if state is None:
                continue
            optimizer.load_state_dict(state)
            key, old, new = rates[part]
            if old != new:
                scale_rates(optimizer, new / old)
                print(f"note: cfg['{key}'] changed from {old:g} to {new:g} since the checkpoint: the learning rate "
                      f"is now {optimizer.param_groups[0]['lr']:.6g} (decays so far kept)")


def scale_rates(optimizer, factor):
    """Multiply the learning rates of an optimiser and the values its warm-up rises to."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "target_lr" in group:
            group["target_lr"] *= factor
