"""Per-task head modules and their loss. Each task may bring its own head and label set; causal and
seq2seq LMs use the base model's own LM head instead (shared, nothing per task). Which task type uses
which head, and how it is built from an artifact's spec: ``tasks.py``."""

from __future__ import annotations

import torch
from torch import nn


def _init_linear(linear: nn.Linear, std: float = 0.02) -> None:
    nn.init.normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per row: (B, T, d) -> (B, d).

    ``first`` reads token 0 ([CLS] in encoders); ``last`` reads each row's last non-padding token
    (decoders), which works with left or right padding.
    """
    if pooling == "first":
        return hidden[:, 0]
    if pooling != "last":
        raise ValueError(f"unknown pooling {pooling!r}")
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.to(torch.long) * positions).argmax(dim=1)  # (B,) index of the last 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SequenceClassificationHead(nn.Module):
    """dropout -> dense(d, d) -> tanh -> dropout -> out(d, labels), on one pooled token per row."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, dropout: float = 0.1):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)
        _init_linear(self.dense)
        _init_linear(self.out)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        x = pool(hidden, attention_mask, self.pooling)  # (B, d)
        x = torch.tanh(self.dense(self.dropout(x)))
        return self.out(self.dropout(x))  # (B, labels)


class TokenClassificationHead(nn.Module):
    """dropout -> out(d, labels) on every token."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)
        _init_linear(self.out)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.out(self.dropout(hidden))  # (B, T, labels)


def head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (B, L) or (B, T, L) logits; label -100 is ignored (padding, sub-words).

    Logits of labels a task does not have are -inf (mixed batches pad label sets), which
    cross-entropy handles exactly: they get zero probability and zero gradient.
    """
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
