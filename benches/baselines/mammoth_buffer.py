"""Baselines: rehearsal buffers written the way the public continual-learning code writes them.

``MammothStyleBuffer`` follows the structure of Mammoth's ``utils/buffer.py`` reservoir buffer
(read, not copied): tensors preallocated from the first batch, then a Python loop over every
example with one ``np.random.randint`` draw and one tensor copy per stored attribute.
``PerExampleCBRS`` is class-balancing reservoir sampling (Chrysakis and Moens 2020) as a
per-example loop over a label tensor, the way public reimplementations do it: class counts
from the stored labels, the largest class by a scan, its members found by a mask over the
buffer. Timing only: these are the "public code's way" the benchmark compares against.
"""

from __future__ import annotations

import numpy as np
import torch


def reservoir(num_seen_examples: int, buffer_size: int) -> int:
    """Slot for the next example, or -1 to drop it (Algorithm R, one numpy draw)."""
    if num_seen_examples < buffer_size:
        return num_seen_examples
    rand = np.random.randint(0, num_seen_examples + 1)
    if rand < buffer_size:
        return rand
    return -1


class MammothStyleBuffer:
    def __init__(self, buffer_size: int, device: str | torch.device = "cpu"):
        self.buffer_size = buffer_size
        self.device = device
        self.num_seen_examples = 0
        self.attributes = ["examples", "labels"]

    def init_tensors(self, **batch: torch.Tensor) -> None:
        for name, t in batch.items():
            setattr(self, name, torch.zeros((self.buffer_size, *t.shape[1:]), dtype=t.dtype, device=self.device))

    def add_data(self, examples: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if not hasattr(self, "examples"):
            batch = {"examples": examples}
            if labels is not None:
                batch["labels"] = labels
            self.init_tensors(**batch)
        for i in range(examples.shape[0]):
            index = reservoir(self.num_seen_examples, self.buffer_size)
            self.num_seen_examples += 1
            if index >= 0:
                self.examples[index] = examples[i].to(self.device)
                if labels is not None:
                    self.labels[index] = labels[i].to(self.device)


class PerExampleCBRS:
    def __init__(self, buffer_size: int, device: str | torch.device = "cpu"):
        self.buffer_size = buffer_size
        self.device = device
        self.num_stored = 0
        self.seen_per_class: dict[int, int] = {}
        self.full_classes: set[int] = set()

    def add_data(self, examples: torch.Tensor, labels: torch.Tensor) -> None:
        if not hasattr(self, "examples"):
            self.examples = torch.zeros((self.buffer_size, *examples.shape[1:]), dtype=examples.dtype,
                                        device=self.device)
            self.labels = torch.zeros(self.buffer_size, dtype=labels.dtype, device=self.device)
        for i in range(examples.shape[0]):
            y = int(labels[i])
            self.seen_per_class[y] = self.seen_per_class.get(y, 0) + 1
            if self.num_stored < self.buffer_size:
                index = self.num_stored
                self.num_stored += 1
            else:
                counts = torch.bincount(self.labels)
                largest = counts.max()
                for c in torch.nonzero(counts == largest).flatten().tolist():
                    self.full_classes.add(c)
                if y not in self.full_classes:
                    members = torch.nonzero(self.labels == int(torch.argmax(counts))).flatten()
                    index = int(members[np.random.randint(len(members))])
                else:
                    if np.random.rand() > int(counts[y]) / self.seen_per_class[y]:
                        continue
                    members = torch.nonzero(self.labels == y).flatten()
                    index = int(members[np.random.randint(len(members))])
            self.examples[index] = examples[i].to(self.device)
            self.labels[index] = labels[i].to(self.device)
