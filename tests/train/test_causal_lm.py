"""causal_lm tasks: prompt/response files and chats, loss on the response only, exact match and
perplexity; an adapter trained on a tiny llama learns answers the base model does not give."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import adapterkit as ak
from adapterkit.causal_lm import (
    encode_lm_example,
    exact_match,
    generate_answers,
    load_lm_task,
    looks_labelled,
    normalise_answer,
    perplexity,
    response_nll,
)
from adapterkit.data import DataError, Example, collate

ANIMALS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "owl": "hoot", "sheep": "baa"}
WORDS = ["what", "does", "the", "a", "say", "sound", "of", "tell", "me", "please", "<user>", "<assistant>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> tuple[Path, object]:
    """A tiny random llama and a word-level tokenizer (with EOS and a chat template), as a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    vocab = ["<pad>", "<unk>", "<eos>", "<system>"] + sorted(set(WORDS) | set(ANIMALS) | set(ANIMALS.values()))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    config = AutoConfig.for_model(
        "llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=len(vocab), max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
        bos_token_id=None,
        # The final RMSNorm fixes the scale of what reaches the LM head, so the head's own scale caps the
        # logits: at the default 0.02 a 32-wide model can never be confident (loss floor ~ln(vocab)).
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder, AutoTokenizer.from_pretrained(folder)


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        animal = rng.choice(sorted(ANIMALS))
        # the animal last: its own position holds what the answer needs (a tiny random model's frozen
        # attention need not carry it there from further back)
        lead = rng.choice(["what does the", "tell me the sound of the", "what does a", "sound of a"])
        out.append({"prompt": f"{lead} {animal}", "response": ANIMALS[animal]})
    return out


def test_reading_prompt_response_and_chats(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        json.dumps({"prompt": "what does the dog say", "response": "woof"}) + "\n"
        + json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "what does the cat say"},
                                   {"role": "assistant", "content": "meow"}]}) + "\n",
        encoding="utf-8",
    )
    data = load_lm_task(jsonl)
    assert data.task_type == "causal_lm" and len(data) == 2
    assert data.examples[0].text == "what does the dog say" and data.examples[0].text_pair == "woof"
    assert data.examples[1].text == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what does the cat say"}]
    assert data.examples[1].text_pair == "meow"
    csv = tmp_path / "train.csv"
    csv.write_text("question,answer\nwhat does the cow say,moo\n", encoding="utf-8")
    data = load_lm_task(csv, prompt_column="question", response_column="answer")
    assert (data.examples[0].text, data.examples[0].text_pair) == ("what does the cow say", "moo")
    assert looks_labelled(data)


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "x"}, "missing column 'response'"),
        ({"prompt": "x", "response": "  "}, "empty text in column .response."),
        ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the assistant"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "at least one message before"),
        ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 0"),
        ({"messages": "not json"}, "not a JSON list"),
    ],
)
def test_bad_rows_name_their_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps(line) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as e:
        load_lm_task(path)
    assert "bad.jsonl:2" in str(e.value)


def test_loss_covers_the_response_and_eos_only(tiny_lm):
    _, tok = tiny_lm
    item = encode_lm_example(Example("what does the dog say", 0, "woof"), tok, max_length=32)
    prompt = tok("what does the dog say")["input_ids"]
    assert item["input_ids"] == prompt + [tok.convert_tokens_to_ids("woof"), tok.eos_token_id]
    assert item["labels"] == [-100] * len(prompt) + [tok.convert_tokens_to_ids("woof"), tok.eos_token_id]
    chat = encode_lm_example(Example([{"role": "user", "content": "what does the cat say"}], 0, "meow"), tok, 32)
    rendered = tok.apply_chat_template([{"role": "user", "content": "what does the cat say"}],
                                       add_generation_prompt=True, tokenize=False)
    n = len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert chat["labels"][:n] == [-100] * n and chat["labels"][n:] == [tok.convert_tokens_to_ids("meow"), tok.eos_token_id]
    # Too long: the prompt loses its beginning, the answer stays whole.
    short = encode_lm_example(Example("what does the dog say", 0, "woof"), tok, max_length=4)
    assert short["input_ids"] == prompt[-2:] + [tok.convert_tokens_to_ids("woof"), tok.eos_token_id]


def test_normalised_exact_match():
    assert normalise_answer("  Spam.\nmore text") == "spam"
    assert normalise_answer('"Location"') == "location"
    assert exact_match(["Ham", "spam!", "no"], ["ham", "spam", "spam"]) == pytest.approx(2 / 3)


def test_training_an_adapter_teaches_the_answers(tiny_lm):
    """Loss on the answers only: after training, the adapter answers held-out prompts exactly; the base
    does not, and the answers' perplexity drops. The base model's weights do not change."""
    from transformers import AutoModelForCausalLM

    folder, tok = tiny_lm
    model = ak.AdapterModel(AutoModelForCausalLM.from_pretrained(folder)).eval()
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    model.add_adapter("animals", ak.AdapterConfig("houlsby", bottleneck_size=16), head="causal_lm")
    report = model.train_adapter("animals")
    assert 0 < report.trainable < report.base_total
    train = [encode_lm_example(Example(r["prompt"], 0, r["response"]), tok, 32) for r in rows(96, seed=1)]
    test_rows = rows(24, seed=2)
    test = [encode_lm_example(Example(r["prompt"], 0, r["response"]), tok, 32) for r in test_rows]
    refs = [r["response"] for r in test_rows]

    def answer_ppl(adapter):
        return perplexity(*response_nll(model, collate(test, tok.pad_token_id), adapter))

    base_em = exact_match(generate_answers(model, tok, [r["prompt"] for r in test_rows], adapter=None, max_new_tokens=2), refs)
    base_ppl = answer_ppl(None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for _epoch in range(12):
        for start in range(0, len(train), 16):
            loss = model(**collate(train[start:start + 16], tok.pad_token_id), adapter_names="animals").loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    answers = generate_answers(model, tok, [r["prompt"] for r in test_rows], adapter="animals", max_new_tokens=2)
    assert exact_match(answers, refs) == 1.0 and base_em < 0.5
    assert answer_ppl("animals") < 1.5 < base_ppl
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())
    # The artifact keeps its task type; the served model reloads it and answers the same.
    path = folder.parent / "animals.safetensors"
    model.save_adapter("animals", path)
    assert ak.read_metadata(path)["task"]["type"] == "causal_lm"
    fresh = ak.AdapterModel(AutoModelForCausalLM.from_pretrained(folder)).eval()
    fresh.load_adapter(path)
    assert generate_answers(fresh, tok, [r["prompt"] for r in test_rows], adapter="animals", max_new_tokens=2) == answers


def test_adapterkit_train_causal_lm_from_a_chat_file(tmp_path, tiny_lm, capsys):
    """``adapterkit train --task-type causal_lm`` on chat data: the loop, the evaluation (exact match of
    the generated answers, perplexity) and the artifact, end to end; the server then answers with it."""
    from adapterkit.cli import main

    folder, tok = tiny_lm

    def write(path, n, seed):
        with open(path, "w", encoding="utf-8") as f:
            for r in rows(n, seed):
                f.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                 {"role": "assistant", "content": r["response"]}]}) + "\n")
        return path

    train, val = write(tmp_path / "train.jsonl", 96, 1), write(tmp_path / "val.jsonl", 24, 2)
    out = tmp_path / "runs" / "animals.safetensors"
    argv = ["train", "--base", str(folder), "--data", str(train), "--validation", str(val), "--task", "animals",
            "--task-type", "causal_lm", "--out", str(out), "--epochs", "8", "--batch-size", "16", "--lr", "1e-2",
            "--bottleneck-size", "16", "--max-length", "32", "--no-progress", "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "runs" / "animals.log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and {"val_exact_match", "val_perplexity", "val_token_accuracy"} <= set(log[0])
    best = max(log, key=lambda h: h["val_accuracy"])
    assert all(h["val_accuracy"] == h["val_exact_match"] for h in log)  # short answers: exact match scores
    assert best["val_exact_match"] >= 0.5 and log[-1]["val_perplexity"] < log[0]["val_perplexity"] / 2
    meta = ak.read_metadata(out)
    assert meta["task"]["type"] == "causal_lm" and meta["metrics"]["val_exact_match"] == best["val_exact_match"]
    code = main([*argv, "--metric", "macro_f1"])
    assert code == 2 and "scored by accuracy" in capsys.readouterr().err


def test_the_hf_trainer_trains_a_causal_lm_adapter(tmp_path, tiny_lm):
    """``AdapterTrainer`` on prompt/response items: loss on the answers only, the base untouched, and
    its checkpoint (only the artifact) answers like the trained model."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, TrainingArguments

    from adapterkit.training.hf import ARTIFACT_NAME, AdapterTrainer

    folder, tok = tiny_lm
    model = ak.AdapterModel(AutoModelForCausalLM.from_pretrained(folder))
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    torch.manual_seed(0)
    model.add_adapter("animals", ak.AdapterConfig("houlsby", bottleneck_size=16), head="causal_lm")
    train = [encode_lm_example(Example(r["prompt"], 0, r["response"]), tok, 32) for r in rows(96, seed=1)]
    test_rows = rows(24, seed=2)
    prompts, refs = [r["prompt"] for r in test_rows], [r["response"] for r in test_rows]
    base_em = exact_match(generate_answers(model.eval(), tok, prompts, adapter=None, max_new_tokens=2), refs)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=12, per_device_train_batch_size=16, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, save_strategy="epoch", save_total_limit=1,
        logging_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = AdapterTrainer(model=model, adapter_name="animals", args=args, train_dataset=train,
                             data_collator=lambda items: collate(items, tok.pad_token_id))
    trainer.train()
    model.eval()
    answers = generate_answers(model, tok, prompts, adapter="animals", max_new_tokens=2)
    assert exact_match(answers, refs) >= 0.9 > base_em + 0.4
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())
    checkpoint = max((tmp_path / "hf").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".bin")) == [ARTIFACT_NAME]
    fresh = ak.AdapterModel(AutoModelForCausalLM.from_pretrained(folder)).eval()
    fresh.load_adapter(checkpoint / ARTIFACT_NAME)
    assert ak.read_metadata(checkpoint / ARTIFACT_NAME)["task"]["type"] == "causal_lm"
    assert generate_answers(fresh, tok, prompts, adapter="animals", max_new_tokens=2) == answers


def test_train_task_type_choices_come_from_the_task_registry(capsys):
    """``--task-type`` offers every trainable record of ``tasks.TASKS`` (causal_lm included) and refuses
    the untrainable ones (``lm``: a base model's own head) with argparse's error naming the choices."""
    import argparse

    from adapterkit.tasks import TASKS, TRAINABLE_TYPES
    from adapterkit.training.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    base = ["train", "--base", "b", "--data", "d.csv", "--task", "t", "--out", "o.safetensors"]
    assert "causal_lm" in TRAINABLE_TYPES and "classification" in TRAINABLE_TYPES
    assert set(TRAINABLE_TYPES) == {n for n, t in TASKS.items() if t.trainable}
    for name in TRAINABLE_TYPES:
        assert parser.parse_args([*base, "--task-type", name]).task_type == name
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--task-type", "lm"])
    assert "invalid choice: 'lm'" in capsys.readouterr().err
