"""seq2seq tasks on tiny random T5 and BART: the prompt is the encoder's input, the response the
decoder's labels (the loss is on it alone); training teaches memorisable answers; exact match scores
the whole generated sequence (never cut by the prompt's width); ``adapterkit train --task-type seq2seq``
writes an artifact that a fresh encoder-decoder loads and answers with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tinymodels import tiny_seq2seq_lm, word_tokenizer
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

import adapterkit as ak
from adapterkit.causal_lm import exact_match, generate_answers, load_lm_task, perplexity, response_nll
from adapterkit.data import DataError, EncodedTask, Example, collate, load_task
from adapterkit.seq2seq import encode_seq2seq_example
from adapterkit.tasks import TASKS, TRAINABLE_TYPES
from adapterkit.training import evaluate

ANIMALS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "owl": "hoot", "sheep": "baa"}
WORDS = ["what", "does", "the", "say", "tell", "me", "please"]
TYPES = ["t5", "bart"]


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS + list(ANIMALS) + list(ANIMALS.values()))


def rows(repeats: int = 1) -> list[dict]:
    """Every animal's question, ``repeats`` times: a dataset a tiny model can memorise. Each prompt (six
    tokens with EOS) is longer than its answer (two), so an answer cut at the prompt's width is empty."""
    return [{"prompt": f"what does the {a} say", "response": s} for a, s in ANIMALS.items()] * repeats


def encoded(tok, data: list[dict]) -> list[dict]:
    return [encode_seq2seq_example(Example(r["prompt"], 0, r["response"]), tok, 32) for r in data]


def ids(tok, text: str) -> list[int]:
    return tok.convert_tokens_to_ids(text.split())


def test_the_record_is_a_generative_type_beside_causal_lm():
    assert TASKS["seq2seq"].generation == "seq2seq" and TASKS["causal_lm"].generation == "causal"
    assert TASKS["seq2seq"].generative and not TASKS["classification"].generative
    assert TASKS["seq2seq"].lane == TASKS["causal_lm"].lane == "generate" and "seq2seq" in TRAINABLE_TYPES
    with pytest.raises(ValueError, match="generation must be one of"):
        type(TASKS["seq2seq"])("x", None, generation="diffusion")


def test_reading_prompt_response_files_and_refusing_chats(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "what does the dog say", "response": "woof"}) + "\n", encoding="utf-8")
    data = load_task(path, task_type="seq2seq")
    assert data.task_type == "seq2seq" and (data.examples[0].text, data.examples[0].text_pair) == (
        "what does the dog say", "woof")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"chat.jsonl:1: a seq2seq example .* not a chat"):
        load_task(chat, task_type="seq2seq")
    assert load_lm_task(chat).task_type == "causal_lm"  # the same file is a causal_lm chat


def test_encoding_puts_the_prompt_in_and_the_response_in_the_labels(tok):
    item = encode_seq2seq_example(Example("tell me what the sheep does say please", 0, "baa"), tok, 32)
    eos = tok.eos_token_id
    assert item["input_ids"] == ids(tok, "tell me what the sheep does say please") + [eos]
    assert item["labels"] == ids(tok, "baa") + [eos]  # no prompt positions: nothing of it is labelled
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    # Each side is cut on its own; a cut response keeps its EOS.
    short = encode_seq2seq_example(Example("what does the dog say", 0, "woof woof woof"), tok, 3)
    assert short["input_ids"] == ids(tok, "what does") + [eos] and short["labels"] == ids(tok, "woof woof") + [eos]
    # A batch pads the encoder inputs and the labels to their own widths; label padding is -100.
    batch = collate([item, encode_seq2seq_example(Example("what does the dog say", 0, "woof woof woof"), tok, 32)],
                    tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 9) and batch["labels"].shape == (2, 4)
    assert batch["labels"][0].tolist() == ids(tok, "baa") + [eos, -100, -100]
    assert batch["input_ids"][1, 6:].tolist() == [tok.pad_token_id] * 3 and batch["attention_mask"][1, 6:].sum() == 0


@pytest.mark.parametrize("model_type", TYPES)
def test_the_loss_is_cross_entropy_over_the_response_tokens_only(tok, model_type):
    """The adapter model's loss equals a hand-computed cross-entropy over the response tokens, from
    logits of decoder inputs built by hand (start token, then the response shifted right); changing
    the prompt changes the logits, but there is no prompt label for the loss to count."""
    base = tiny_seq2seq_lm(model_type, len(tok))
    model = ak.AdapterModel(base)
    model.add_adapter("a", ak.AdapterConfig("houlsby", bottleneck_size=8), head="seq2seq")
    with torch.no_grad():  # away from its near-identity start, so that its effect shows
        for p in model.adapters["a"].parameters():
            p.normal_(0, 0.3)
    batch = collate(encoded(tok, [{"prompt": "what does the duck say please", "response": "quack"},
                                  {"prompt": "tell me the cow", "response": "moo moo"}]), tok.pad_token_id)
    labels = batch["labels"]  # (2, 3): quack <eos> -100 / moo moo <eos>
    start = base.config.decoder_start_token_id
    decoder_in = torch.cat([torch.full((2, 1), start), labels[:, :-1]], 1)  # (2, 3)
    decoder_in[decoder_in == -100] = tok.pad_token_id
    with torch.no_grad():
        loss = model(**batch, adapter_names="a").loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_in, adapter_names="a").logits  # (2, 3, V)
        bare = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=decoder_in).logits
    keep = labels != -100
    by_hand = F.cross_entropy(logits[keep], labels[keep])  # 5 response tokens, padding left out
    assert keep.sum() == 5 and torch.allclose(loss, by_hand, atol=1e-6)
    assert not torch.allclose(logits, bare, atol=1e-4)  # the adapter is in the path the loss sees
    nll, count = response_nll(model, batch, "a")
    assert count == 5 and nll == pytest.approx(float(by_hand) * 5, rel=1e-5)


@pytest.mark.parametrize("model_type", TYPES)
def test_training_memorises_the_answers_and_exact_match_reads_the_generated_text(tok, model_type):
    """A short run lowers the response loss; afterwards ``evaluate`` reports exact match from the
    sequences generated from the encoder input: the same score as the decoded answers' text match,
    and high, which an answer cut at the prompt's width (longer than every answer) could not reach."""
    model = ak.AdapterModel(tiny_seq2seq_lm(model_type, len(tok)))
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    torch.manual_seed(0)
    model.add_adapter("animals", ak.AdapterConfig("houlsby", bottleneck_size=16), head="seq2seq")
    model.train_adapter("animals")
    data = load_task_from_rows(rows(), tok)
    prompts, refs = [r["prompt"] for r in rows()], [r["response"] for r in rows()]
    assert min(len(i["input_ids"]) for i in data.items) > max(len(i["labels"]) for i in data.items)
    first = evaluate(model, "animals", data)
    assert first["exact_match"] == 0.0 == exact_match(generate_answers(model, tok, prompts, adapter="animals"), refs)
    train = encoded(tok, rows(16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _epoch in range(10):
        for start in range(0, len(train), 12):
            loss = model(**collate(train[start : start + 12], tok.pad_token_id), adapter_names="animals").loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    scores = evaluate(model, "animals", data)
    answers = generate_answers(model, tok, prompts, adapter="animals", max_new_tokens=2)
    assert scores["loss"] < first["loss"] / 3 and scores["perplexity"] < first["perplexity"] / 10
    assert scores["exact_match"] >= 0.8 and scores["accuracy"] == scores["exact_match"]
    assert scores["exact_match"] == exact_match(answers, refs)
    assert sum(a == r for a, r in zip(answers, refs, strict=True)) == round(scores["exact_match"] * len(refs))
    assert perplexity(*response_nll(model, collate(data.items, tok.pad_token_id), "animals")) == pytest.approx(
        scores["perplexity"], rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())


def load_task_from_rows(data: list[dict], tok) -> EncodedTask:
    from adapterkit.data import TaskData

    return EncodedTask(TaskData("seq2seq", [], [Example(r["prompt"], 0, r["response"]) for r in data]), tok, 32)


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("tiny-t5")
    tok.save_pretrained(folder)
    tiny_seq2seq_lm("t5", len(tok)).save_pretrained(folder)
    return folder


def write_rows(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return path


def test_adapterkit_train_seq2seq_writes_an_artifact_that_loads_and_generates(tmp_path, t5_folder, capsys):
    """``adapterkit train --task-type seq2seq`` on a JSON Lines file: AutoModelForSeq2SeqLM, the loop, the
    evaluation (exact match, perplexity) and the artifact; a fresh T5 loads it and answers with it as
    the logged best exact match says."""
    from adapterkit.cli import main

    train, val = write_rows(tmp_path / "train.jsonl", rows(16)), write_rows(tmp_path / "val.jsonl", rows())
    out = tmp_path / "runs" / "animals.safetensors"
    argv = ["train", "--base", str(t5_folder), "--data", str(train), "--validation", str(val), "--task", "animals",
            "--task-type", "seq2seq", "--out", str(out), "--epochs", "10", "--batch-size", "12", "--lr", "2e-2",
            "--bottleneck-size", "16", "--max-length", "32", "--no-progress", "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "runs" / "animals.log.jsonl").read_text().splitlines()]
    assert len(log) == 10 and {"val_exact_match", "val_perplexity", "val_token_accuracy"} <= set(log[0])
    assert all(h["val_accuracy"] == h["val_exact_match"] for h in log)
    best = max(log, key=lambda h: h["val_accuracy"])
    assert best["val_exact_match"] >= 0.5 and log[-1]["val_perplexity"] < log[0]["val_perplexity"] / 2
    meta = ak.read_metadata(out)
    assert meta["task"]["type"] == "seq2seq" and meta["metrics"]["val_exact_match"] == best["val_exact_match"]
    fresh = ak.AdapterModel(AutoModelForSeq2SeqLM.from_pretrained(t5_folder)).eval()
    fresh.load_adapter(out)
    tok = AutoTokenizer.from_pretrained(t5_folder)
    answers = generate_answers(fresh, tok, [r["prompt"] for r in rows()], adapter="animals", max_new_tokens=2)
    assert exact_match(answers, [r["response"] for r in rows()]) == best["val_exact_match"]
    assert main([*argv, "--metric", "macro_f1"]) == 2 and "scored by accuracy" in capsys.readouterr().err


def test_the_hf_trainer_trains_a_seq2seq_adapter(tmp_path, t5_folder):
    """``AdapterTrainer`` on encoded seq2seq items: it learns the answers, the base stays untouched, and
    its checkpoint (only the artifact) answers like the trained model."""
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from adapterkit.training.hf import ARTIFACT_NAME, AdapterTrainer

    tok = AutoTokenizer.from_pretrained(t5_folder)
    model = ak.AdapterModel(AutoModelForSeq2SeqLM.from_pretrained(t5_folder))
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    torch.manual_seed(0)
    model.add_adapter("animals", ak.AdapterConfig("houlsby", bottleneck_size=16), head="seq2seq")
    prompts, refs = [r["prompt"] for r in rows()], [r["response"] for r in rows()]
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=10, per_device_train_batch_size=12, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, save_strategy="epoch", save_total_limit=1,
        logging_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = AdapterTrainer(model=model, adapter_name="animals", args=args, train_dataset=encoded(tok, rows(16)),
                             data_collator=lambda items: collate(items, tok.pad_token_id))
    trainer.train()
    model.eval()
    answers = generate_answers(model, tok, prompts, adapter="animals", max_new_tokens=2)
    assert exact_match(answers, refs) >= 0.8
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())
    checkpoint = max((tmp_path / "hf").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin")) == [ARTIFACT_NAME]
    fresh = ak.AdapterModel(AutoModelForSeq2SeqLM.from_pretrained(t5_folder)).eval()
    fresh.load_adapter(checkpoint / ARTIFACT_NAME)
    assert ak.read_metadata(checkpoint / ARTIFACT_NAME)["task"]["type"] == "seq2seq"
    assert generate_answers(fresh, tok, prompts, adapter="animals", max_new_tokens=2) == answers
