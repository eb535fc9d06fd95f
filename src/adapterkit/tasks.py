"""The task registry: one record per task type, from which heads, data, the model and the server derive.

A task type says what a task's adapter is trained and served for: its head class (or none: the base
model's own outputs), whether the head reads one pooled token per row or every token, how examples
carry labels, and which serving endpoint (and batching lane) answers it. Adding a task type is one
record in ``TASKS`` (plus its head class in ``heads.py`` and, to serve it, an endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .heads import SequenceClassificationHead, TokenClassificationHead

# The base model's shapes of generative tasks (``TaskType.generation``).
GENERATIONS: tuple[str, ...] = ("causal", "seq2seq")


@dataclass(frozen=True)
class TaskType:
    """One task type.

    Attributes:
        name: the ``head=`` argument of ``add_adapter`` and the artifact's ``task.type``.
        head: the head class, built as ``head(hidden_size, num_labels, [pooling,] dropout)``; None: no
            head of its own (the base model's outputs are the task's outputs, an LM's head shared).
        pooled: the head reads one token per row (``SiteSpec.pooling``: [CLS] or the last token), so
            architectures without a pooling token cannot take it.
        per_token: logits and labels per token (B, T, L) rather than per row (B, L); a batch cannot
            mix per-token and per-row heads.
        pair: an example is two texts (``text``, ``text_pair``), fed to the tokenizer as a pair.
        labels: how an example carries its labels: ``"row"`` (one label), ``"word"`` (one tag per word,
            on its first sub-word; -100 elsewhere) or None (no labels: language modelling).
        endpoint: the server's endpoint for this task type; ``lane``: its batching lane there.
        trainable: ``adapterkit train --task-type`` accepts it (it has labelled or prompt/response data).
        generation: for a task trained on prompt/response data (``causal_lm.load_lm_task``) and scored by
            its generated answers, the base model's shape: ``"causal"`` (a decoder-only LM: prompt and
            response in one sequence, ``AutoModelForCausalLM``) or ``"seq2seq"`` (an encoder-decoder:
            the prompt in, the response as the decoder's labels, ``AutoModelForSeq2SeqLM``); None for
            every other task. Data reading, encoding, the base's auto class and evaluation derive from it.
    """

    name: str
    head: type[nn.Module] | None
    pooled: bool = False
    per_token: bool = False
    pair: bool = False
    labels: str | None = "row"
    endpoint: str | None = None
    lane: str | None = None
    trainable: bool = True
    generation: str | None = None

    def __post_init__(self) -> None:
        if self.generation is not None and self.generation not in GENERATIONS:
            raise ValueError(f"task type {self.name!r}: generation must be one of {GENERATIONS} or None")

    @property
    def generative(self) -> bool:
        """Trained on prompt/response pairs and scored by its generated answers."""
        return self.generation is not None

    def build_head(self, spec: dict[str, Any], hidden_size: int, pooling: str | None) -> nn.Module:
        """This type's head from its JSON spec ``{"type", "num_labels", "dropout"}``."""
        if self.head is None:
            raise ValueError(f"task type {self.name!r} has no head of its own")
        n, dropout = int(spec["num_labels"]), float(spec.get("dropout", 0.1))
        if n < 1:
            raise ValueError(f"a {self.name} head needs at least one label")
        if not self.pooled:
            return self.head(hidden_size, n, dropout)
        if pooling is None:
            raise ValueError(
                "sequence-classification heads need a pooling token; this architecture has none "
                "(encoder-decoder models use their LM head)"
            )
        return self.head(hidden_size, n, pooling, dropout)


TASKS: dict[str, TaskType] = {
    t.name: t
    for t in (
        TaskType("classification", SequenceClassificationHead, pooled=True,
                 endpoint="/v1/classify", lane="classify"),
        TaskType("pair_classification", SequenceClassificationHead, pooled=True, pair=True,
                 endpoint="/v1/classify", lane="classify"),
        TaskType("token_classification", TokenClassificationHead, per_token=True, labels="word",
                 endpoint="/v1/tag", lane="tag"),
        # head=None on a base that can generate: its own LM head, shared by every task
        TaskType("lm", None, labels=None, endpoint="/v1/generate", lane="generate", trainable=False),
        # head=None on any other base: its own outputs (hidden states)
        TaskType("none", None, labels=None, endpoint="/v1/generate", lane="generate", trainable=False),
        # an LM adapter trained on prompt/response pairs (causal_lm.py reads its data; loss on the response)
        TaskType("causal_lm", None, labels=None, endpoint="/v1/generate", lane="generate", generation="causal"),
        # the same for an encoder-decoder (T5, BART): the prompt is the encoder's input (seq2seq.py)
        TaskType("seq2seq", None, labels=None, endpoint="/v1/generate", lane="generate", generation="seq2seq"),
    )
}

# Task types with a head of their own (trained from labelled examples), and those without.
HEAD_TYPES: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.head is not None)
HEADLESS_TYPES: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.head is None)
# Task types one can train from a data file (``adapterkit train --task-type``).
TRAINABLE_TYPES: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.trainable)


def get_task(name: str) -> TaskType:
    """The task type called ``name``; ValueError naming the known ones otherwise."""
    task = TASKS.get(name) if isinstance(name, str) else None
    if task is None:
        raise ValueError(f"unknown task type {name!r}; expected one of {', '.join(TASKS)}")
    return task


def headless_task(base: nn.Module) -> str:
    """The task type of ``add_adapter(head=None)`` on ``base``: ``lm`` when it can generate."""
    return "lm" if hasattr(base, "generate") and base.can_generate() else "none"


def build_head(spec: dict[str, Any], hidden_size: int, pooling: str | None) -> nn.Module:
    """Build a head from its JSON spec: {"type", "num_labels", "dropout"}."""
    task = TASKS.get(spec["type"])
    if task is None or task.head is None:
        raise ValueError(f"unknown head type {spec['type']!r}; expected one of {', '.join(HEAD_TYPES)}")
    return task.build_head(spec, hidden_size, pooling)


def tasks_for_lane(lane: str) -> tuple[str, ...]:
    """The task types one serving lane (``classify``, ``tag``, ``generate``) answers."""
    return tuple(n for n, t in TASKS.items() if t.lane == lane)
