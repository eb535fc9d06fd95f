"""`adapterkit predict` / `evaluate`, reloading `--full` results, and what a training run prints and leaves."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from conftest import make_sentiment, write_jsonl
from transformers import AutoModel, AutoTokenizer

import adapterkit.training.loop as loop_module
from adapterkit import AdapterConfig, AdapterModel, BaseModelMismatch, read_metadata
from adapterkit.cli import main
from adapterkit.data import EncodedTask, load_task
from adapterkit.training import TrainConfig, fit, run_paths
from adapterkit.training.predict import load_trained


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "train.jsonl", make_sentiment(96, 0)), write_jsonl(folder / "val.jsonl", make_sentiment(32, 1))


def _train_argv(base, data, out, *extra):
    return ["train", "--base", str(base), "--data", str(data[0]), "--validation", str(data[1]), "--task", out.stem,
            "--out", str(out), "--batch-size", "16", "--max-length", "32", "--threads", "1", *extra]


@pytest.fixture(scope="module")
def two_minilm_artifacts(tmp_path_factory, minilm, data):
    """Two quickly trained MiniLM adapters on the sentiment data: `s` (houlsby) and `t` (pfeiffer, own labels)."""
    folder = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    s = folder / "s.safetensors"
    assert main(_train_argv(minilm, data, s, "--epochs", "2", "--lr", "3e-3", "--no-progress")) == 0
    # a second task over other label names, the polarity as "good" / "bad", so the two heads differ
    def relabel(rows):
        return [{"text": r["text"], "label": "good" if r["label"] == "pos" else "bad"} for r in rows]

    other = write_jsonl(folder / "t_train.jsonl", relabel(make_sentiment(96, 2))), write_jsonl(
        folder / "t_val.jsonl", relabel(make_sentiment(32, 1)))
    t = folder / "t.safetensors"
    assert main(_train_argv(minilm, other, t, "--epochs", "1", "--lr", "3e-3", "--kind", "pfeiffer", "--no-progress")) == 0
    return s, t


def test_predict_several_artifacts_is_one_mixed_stream(tmp_path, minilm, data, two_minilm_artifacts, capsys):
    s, t = two_minilm_artifacts
    out = tmp_path / "preds.jsonl"
    code = main(["predict", str(s), str(t), "--base", str(minilm), "--data", str(data[1]), "--out", str(out),
                 "--batch-size", "5", "--max-length", "32", "--threads", "1"])  # 5: chunks cut through rows
    assert code == 0, capsys.readouterr().err
    assert "64 predictions (32 rows x 2 artifacts: s, t)" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["row"], r["adapter"]) for r in records] == [(i, n) for i in range(32) for n in ("s", "t")]
    # each row equals that row run alone through its own adapter, one adapter for the whole batch
    model, names, tokenizer = load_trained([s, t], minilm)
    rows = [json.loads(line) for line in data[1].read_text().splitlines()]
    for name in names:
        batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            probs = model(**batch, adapter_names=name).logits.softmax(-1)
        mine = [r for r in records if r["adapter"] == name]
        assert [r["label"] for r in mine] == [model.labels(name)[i] for i in probs.argmax(-1).tolist()]
        assert all(abs(r["score"] - p) < 1e-4 for r, p in zip(mine, probs.max(-1).values.tolist(), strict=True))
    gold = [r["label"] for r in rows]
    accuracy = sum(r["label"] == g for r, g in zip([r for r in records if r["adapter"] == "s"], gold, strict=True)) / 32
    assert accuracy == read_metadata(s)["metrics"]["val_accuracy"]  # the same number training logged

    out_csv = tmp_path / "preds.csv"
    assert main(["predict", str(s), "--base", str(minilm), "--data", str(data[1]), "--out", str(out_csv), "--threads", "1"]) == 0
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == [r["label"] for r in records if r["adapter"] == "s"]
    assert list(table[0]) == ["row", "adapter", "label", "score"]


def test_evaluate_reports_accuracy_macro_f1_and_each_class(tmp_path, minilm, data, two_minilm_artifacts, capsys):
    s, _ = two_minilm_artifacts
    assert main(["evaluate", str(s), "--base", str(minilm), "--data", str(data[1]), "--max-length", "32",
                 "--threads", "1", "--json", "-"]) == 0
    scores = json.loads(capsys.readouterr().out)
    meta = read_metadata(s)["metrics"]
    assert (scores["accuracy"], scores["macro_f1"]) == (meta["val_accuracy"], meta["val_macro_f1"])
    assert [r["label"] for r in scores["per_class"]] == ["neg", "pos"]
    assert sum(r["support"] for r in scores["per_class"]) == scores["examples"] == 32
    assert scores["macro_f1"] == pytest.approx(sum(r["f1"] for r in scores["per_class"]) / 2)
    saved = tmp_path / "scores.json"
    assert main(["evaluate", str(s), "--base", str(minilm), "--data", str(data[1]), "--max-length", "32",
                 "--threads", "1", "--json", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and f"accuracy={scores['accuracy']:.4f}" in printed
    assert json.loads(saved.read_text())["per_class"] == scores["per_class"]


def test_predict_and_evaluate_errors_are_one_line(tmp_path, minilm, data, two_minilm_artifacts, capsys):
    s, t = two_minilm_artifacts
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "good film", "label": "pos"}, {"sentence": "x", "label": "neg"}])
    assert main(["predict", str(s), "--base", str(minilm), "--data", str(bad), "--out", str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err == f"adapterkit predict: error: {bad}:2: missing column 'text' (columns: sentence, label)\n"
    assert not (tmp_path / "p.csv").exists()
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "good film", "label": "meh"}])
    assert main(["evaluate", str(s), "--base", str(minilm), "--data", str(odd)]) == 2
    assert "odd.jsonl:1: unknown label 'meh'" in capsys.readouterr().err
    assert main(["predict", str(s), "--base", str(minilm), "--data", str(data[1]), "--out", str(tmp_path / "p.txt")]) == 2
    assert "written as .csv or .jsonl" in capsys.readouterr().err


def test_full_result_reloads_at_its_best_epoch(tmp_path, tiny_bert, data, monkeypatch):
    """The artifact of a 2-epoch --full run whose best epoch is the 2nd loads back with its base file;
    onto the original base it is refused with two different ids and the file to use."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(data[0]), load_task(data[1])
    model = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    torch.manual_seed(0)
    model.add_adapter("s", AdapterConfig(leave_out=[0, 1], train_layer_norms=False), head="classification", labels=train.labels)
    real_evaluate, scripted = loop_module.evaluate, iter([0.5, 0.8])

    def second_epoch_best(*args, **kwargs):
        scores = real_evaluate(*args, **kwargs)
        return {**scores, "accuracy": next(scripted)}

    monkeypatch.setattr(loop_module, "evaluate", second_epoch_best)
    out = tmp_path / "s.safetensors"
    result = fit(model, "s", train, val, tokenizer, out, TrainConfig(epochs=2, lr=1e-3, batch_size=16, full=True, progress=False))
    assert result.best_epoch == 2 and read_metadata(out)["metrics"]["epoch"] == 2
    val_set = EncodedTask(val, tokenizer)
    expected = real_evaluate(model, "s", val_set)  # fit leaves the best weights in the model

    reloaded, names, _ = load_trained([out], tiny_bert)
    assert names == ["s"]
    assert real_evaluate(reloaded, "s", val_set) == expected
    for k, v in model.base.state_dict().items():
        assert torch.equal(reloaded.base.state_dict()[k], v), k

    original = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    with pytest.raises(BaseModelMismatch) as caught:
        original.load_adapter(out)
    message = str(caught.value)
    trained_for, this_model = message.split("trained for base model ")[1].split(", but this model is ")
    assert trained_for.split(":")[0] != this_model.split(":")[0]  # "[id weights digest" differs
    assert f"{run_paths(out)['base']}" in message and "load_trained" in message


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))


def test_captured_output_is_a_few_lines_per_epoch_and_files_share_permissions(tmp_path, tiny_bert, data):
    """Not a terminal: no bars (ours or transformers'), one line per epoch, a final line naming its
    metric; the checkpoint is gone after success; every file written has the same permissions."""
    out = tmp_path / "runs" / "s.safetensors"
    epochs = 3
    argv = _train_argv(tiny_bert, data, out, "--epochs", str(epochs), "--lr", "1e-2", "--checkpoint-steps", "2", "--full")
    proc = subprocess.run([sys.executable, "-m", "adapterkit.cli", *argv], capture_output=True, text=True,
                          env=_clean_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()  # splitlines also splits a bar's carriage returns
    assert len(lines) < 30 * epochs, lines
    epoch_lines = [x for x in lines if " epoch " in x and "train_loss=" in x]
    assert [x.split(":")[0] for x in epoch_lines] == [f"s epoch {e}/{epochs}" for e in range(1, epochs + 1)]
    assert "val_accuracy=" in lines[-1] and lines[-1].startswith("best epoch ")
    paths = run_paths(out)
    checkpoint = paths["checkpoint"]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["latest.json"]  # step folders removed
    assert json.loads((checkpoint / "latest.json").read_text())["complete"] is True
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out, paths["log"], paths["plot"], paths["base"],
                                                            checkpoint / "latest.json")}
    assert len(set(modes.values())) == 1, modes
    # resuming the finished run has nothing left to do, and says what it resumed
    proc = subprocess.run([sys.executable, "-m", "adapterkit.cli", *argv, "--resume"], capture_output=True, text=True,
                          env=_clean_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train_loss=" not in proc.stdout and "resuming from" in proc.stdout


def test_no_progress_prints_only_the_final_line(tmp_path, tiny_bert, data):
    out = tmp_path / "s.safetensors"
    argv = _train_argv(tiny_bert, data, out, "--epochs", "1", "--no-progress", "--keep-checkpoints")
    proc = subprocess.run([sys.executable, "-m", "adapterkit.cli", *argv], capture_output=True, text=True,
                          env=_clean_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and proc.stdout.startswith("best epoch 1 of 1: val_accuracy=")
    assert "%|" not in proc.stderr and "Loading" not in proc.stderr, proc.stderr
    assert [p.name for p in run_paths(out)["checkpoint"].glob("step-*")]  # --keep-checkpoints kept it


def test_options_the_mode_ignores_are_refused(tmp_path, tiny_bert, data, capsys):
    argv = _train_argv(tiny_bert, data, tmp_path / "s.safetensors", "--full", "--kind", "pfeiffer", "--bottleneck-size", "8")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("adapterkit train: error: --full trains the whole model, not an adapter: --kind, --bottleneck-size")
    assert not (tmp_path / "s.safetensors").exists()
