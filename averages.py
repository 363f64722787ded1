"""Running averages of a run's statistics: weighted by counts on the host (Average), and summed on the device
between two reads (StepSums), so that a training step never waits for the device."""
import torch


class Average:
    """Running average weighted by counts."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, count=1):
        self.add(value * count, count)

    def add(self, total, count):
        """Add `count` items whose values sum to `total`."""
        self.sum += total
        self.count += count

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


class StepSums:
    """The statistics of the training steps since they were last read, summed where they were computed (on the
    GPU, the device): reading them is the training loop's one host synchronisation, every print_freq steps
    and at the end of each epoch."""

    def __init__(self):
        self.sums, self.counts = {}, {}
        self.first_loss = self.highest_loss = None  # 0-d tensors

    def add(self, stats):
        """Add one step's {name: (0-d tensor, count)}."""
        for key, (value, count) in stats.items():
            weighted = value.detach().double() * count
            self.sums[key] = self.sums[key] + weighted if key in self.sums else weighted
            self.counts[key] = self.counts.get(key, 0) + count
        loss = stats["loss"][0].detach()
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.highest_loss = loss if self.highest_loss is None else torch.maximum(self.highest_loss, loss)

    def read(self):
        """({name: (sum, count)}, the highest loss, the first loss), read from the device at once."""
        keys = list(self.sums)
        values = torch.stack([self.sums[key] for key in keys]
                             + [self.highest_loss.double(), self.first_loss.double()]).tolist()
        return {key: (total, self.counts[key]) for key, total in zip(keys, values)}, values[-2], values[-1]
