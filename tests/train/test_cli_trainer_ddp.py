"""`adapterkit train`, the Hugging Face Trainer subclass, and 2-process DDP on CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_sentiment, write_jsonl
from transformers import AutoModel, AutoTokenizer

from adapterkit import AdapterConfig, AdapterModel, read_metadata
from adapterkit.artifact import read_artifact
from adapterkit.cli import main
from adapterkit.train import run_paths


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", make_sentiment(64, 0)), write_jsonl(tmp_path / "val.jsonl", make_sentiment(32, 1))


def test_cli_trains_and_resumes(tmp_path, tiny_bert, files, capsys):
    out = tmp_path / "runs" / "s.safetensors"
    argv = ["train", "--base", str(tiny_bert), "--data", str(files[0]), "--validation", str(files[1]), "--task", "s",
            "--out", str(out), "--epochs", "1", "--batch-size", "16", "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert "best epoch 1" in capsys.readouterr().out
    assert read_metadata(out)["task"]["labels"] == ["neg", "pos"]
    assert main([*argv, "--resume"]) == 0  # nothing left to do: the checkpoint says the run is complete
    assert len(run_paths(out)["log"].read_text().splitlines()) == 1


def test_cli_trains_a_lora_and_an_ia3_adapter(tmp_path, tiny_bert, files, capsys):
    common = ["--base", str(tiny_bert), "--data", str(files[0]), "--validation", str(files[1]), "--epochs", "1",
              "--batch-size", "32", "--no-progress", "--threads", "1"]
    lora, ia3 = tmp_path / "lora.safetensors", tmp_path / "ia3.safetensors"
    assert main(["train", *common, "--task", "l", "--out", str(lora), "--kind", "lora", "--lora-r", "8",
                 "--lora-alpha", "16", "--lora-targets", "q,v"]) == 0
    config = read_metadata(lora)["config"]
    assert (config["kind"], config["bottleneck_size"], config["alpha"], config["targets"]) == ("lora", 8, 16.0, ["q", "v"])
    assert {k.split(".")[2] for k in read_artifact(lora).tensors if k.startswith("layers.")} == {"q", "v"}
    assert main(["train", *common, "--task", "i", "--out", str(ia3), "--kind", "ia3", "--ia3-targets", "k,v"]) == 0
    assert read_metadata(ia3)["config"]["targets"] == ["k", "v"]
    capsys.readouterr()
    code = main(["train", *common, "--task", "h", "--out", str(tmp_path / "h.safetensors"), "--lora-r", "4"])
    assert code == 2 and capsys.readouterr().err == "adapterkit train: error: --lora-r need --kind lora (got --kind houlsby)\n"


def test_cli_errors_are_one_line(tmp_path, tiny_bert, files, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhi,pos\n")
    code = main(["train", "--base", str(tiny_bert), "--data", str(bad), "--task", "s", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"adapterkit train: error: {bad}:2: missing column 'text' (columns: sentence, label)\n"
    code = main(["train", "--base", str(tiny_bert), "--data", str(files[0]), "--validation", str(files[1]), "--task", "s",
                 "--out", str(tmp_path / "x.safetensors"), "--batch-size", "0"])
    assert code == 2 and capsys.readouterr().err == "adapterkit train: error: batch_size must be >= 1; got 0\n"


KIND_CONFIGS = {"houlsby": dict(kind="houlsby"), "dora": dict(kind="lora", targets=["q", "v", "down"], dora=True),
                "ia3": dict(kind="ia3")}


@pytest.mark.parametrize("kind", list(KIND_CONFIGS))
def test_hf_trainer_checkpoints_hold_only_the_adapter(tmp_path, tiny_bert, files, kind):
    pytest.importorskip("accelerate")
    from transformers import TrainingArguments

    from adapterkit.data import EncodedTask, load_task
    from adapterkit.hf_trainer import ARTIFACT_NAME, AdapterTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    train, val = load_task(files[0]), load_task(files[1], labels=["neg", "pos"])
    train_set, val_set = EncodedTask(train, tokenizer), EncodedTask(val, tokenizer)
    model = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    torch.manual_seed(0)
    model.add_adapter("s", AdapterConfig(**KIND_CONFIGS[kind]), head="classification", labels=train.labels)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    initial = {k: v.clone() for k, v in model.adapters["s"].state_dict().items()}
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), num_train_epochs=2, per_device_train_batch_size=16, learning_rate=1e-2,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="eval_loss",
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )
    trainer = AdapterTrainer(model=model, adapter_name="s", args=args, train_dataset=train_set, eval_dataset=val_set,
                             data_collator=train_set.collate)
    trainer.train()
    checkpoints = sorted((tmp_path / "hf").glob("checkpoint-*"))
    assert len(checkpoints) == 2
    for folder in checkpoints:
        assert sorted(p.name for p in folder.iterdir()) == [ARTIFACT_NAME, "trainer_state.json"]
    best = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["best_model_checkpoint"]
    saved = read_artifact(Path(best) / ARTIFACT_NAME).tensors
    assert all(torch.equal(v, saved[k]) for k, v in model.adapters["s"].state_dict().items())
    trained = [k for k, v in model.adapters["s"].state_dict().items() if not torch.equal(v, initial[k])]
    assert {k.rsplit(".", 1)[-1] for k in trained if k.startswith("layers.")} >= (  # every kind's own tensors learn
        {"A", "B", "magnitude"} if kind == "dora" else {"l"} if kind == "ia3" else set()), trained
    assert all(torch.equal(v, base_before[k]) for k, v in model.base.state_dict().items())  # base untouched
    fresh = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    fresh.load_adapter(Path(best) / ARTIFACT_NAME)


def _cli(minilm, files, out, extra=()):
    return ["-m", "adapterkit.cli", "train", "--base", str(minilm), "--data", str(files[0]), "--validation", str(files[1]),
            "--task", "s", "--out", str(out), "--epochs", "2", "--batch-size", "16", "--lr", "3e-3", "--max-length", "32",
            "--no-progress", "--threads", "1", *extra]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, from /proc: torchrun starts each worker in a session of its
    own, so killing torchrun's process group leaves them (and their hold on our pipes) behind."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _run_group(cmd, env, timeout=600):
    """Run ``cmd`` in its own session; past ``timeout`` (a hang guard, not a speed check) kill it and
    every process it started, workers in sessions of their own included, and fail."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stragglers = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            err = "(no output: the pipes stayed open)"
        pytest.fail(f"timed out: {' '.join(cmd[:6])}...\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_match_one_process(tmp_path, minilm, files):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    single = tmp_path / "single" / "s.safetensors"
    proc = _run_group([sys.executable, *_cli(minilm, files, single)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = tmp_path / "ddp" / "s.safetensors"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = _run_group([*launcher, *_cli(minilm, files, ddp)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best epoch") == 1  # only rank 0 reports
    # one artifact (and its log, plot, checkpoint), from rank 0; no stray temp files
    assert sorted(p.name for p in ddp.parent.iterdir()) == ["s.ckpt", "s.log.jsonl", "s.png", "s.safetensors"]
    one, two = (read_metadata(p)["metrics"] for p in (single, ddp))
    history_one = [json.loads(x) for x in run_paths(single)["log"].read_text().splitlines()]
    history_two = [json.loads(x) for x in run_paths(ddp)["log"].read_text().splitlines()]
    assert [h["step"] for h in history_one] == [h["step"] for h in history_two]  # same global batches
    assert two["val_accuracy"] >= 0.85 and abs(one["val_accuracy"] - two["val_accuracy"]) <= 0.07, (one, two)


DDP_SCRIPT = '''
import os, signal, sys
import torch
import adapterkit.train as T
from adapterkit import AdapterConfig, AdapterModel
from adapterkit.data import load_task
from transformers import AutoModel, AutoTokenizer

folder, train_path, val_path, out, mode = sys.argv[1:6]
torch.set_num_threads(1)
train, val = load_task(train_path), load_task(val_path)
model = AdapterModel(AutoModel.from_pretrained(folder))
torch.manual_seed(0)
model.add_adapter("s", AdapterConfig("houlsby"), head="classification", labels=train.labels)
if mode == "interrupt":  # SIGTERM reaches rank 1 alone, during the 5th optimizer step
    real = T._linear_schedule

    def schedule(warmup, total):
        factor = real(warmup, total)

        def wrapped(step):
            if step == 5 and os.environ["RANK"] == "1":
                signal.raise_signal(signal.SIGTERM)
            return factor(step)

        return wrapped

    T._linear_schedule = schedule
config = T.TrainConfig(epochs=2, lr=1e-2, batch_size=16, progress=False, checkpoint_steps=2)
try:
    T.fit(model, "s", train, val, AutoTokenizer.from_pretrained(folder), out, config, resume=mode == "resume")
except T.TrainingInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(3)
'''


@pytest.mark.slow
def test_ddp_resume_restores_every_process_dropout_stream(tmp_path, tiny_bert):
    """Both ranks' RNG states travel in the checkpoint: an interrupted and resumed 2-process run (BERT
    dropout on) ends bit-identical to an uninterrupted one."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    data = [write_jsonl(tmp_path / "train.jsonl", make_sentiment(96, 0)), write_jsonl(tmp_path / "val.jsonl", make_sentiment(32, 1))]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tiny_bert), *map(str, data)]
    reference, out = tmp_path / "a" / "s.safetensors", tmp_path / "b" / "s.safetensors"
    proc = _run_group([*launcher, str(reference), "full"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run_group([*launcher, str(out), "interrupt"], env)
    assert proc.returncode != 0 and "stopped at step 5" in proc.stderr, proc.stderr[-3000:]
    checkpoint = run_paths(out)["checkpoint"]
    assert json.loads((checkpoint / "latest.json").read_text())["step"] == 5
    proc = _run_group([*launcher, str(out), "resume"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected, got = read_artifact(reference).tensors, read_artifact(out).tensors
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    logs = [[json.loads(x)["val_loss"] for x in run_paths(p)["log"].read_text().splitlines()] for p in (reference, out)]
    assert logs[0] == logs[1]


def test_cli_sites_option_guess_json_and_bad(tmp_path, tiny_bert, files, capsys):
    """`--sites` reaches AdapterModel: 'guess' and a JSON SiteSpec train; a bad value is a one-line error."""
    import json

    from adapterkit.sites import sites_for

    common = ["train", "--base", str(tiny_bert), "--data", str(files[0]), "--validation", str(files[1]), "--task", "s",
              "--epochs", "1", "--batch-size", "32", "--no-progress", "--threads", "1"]
    guessed = tmp_path / "guess.safetensors"
    assert main([*common, "--out", str(guessed), "--sites", "guess"]) == 0
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(sites_for("bert").to_dict()))
    from_json = tmp_path / "json.safetensors"
    assert main([*common, "--out", str(from_json), "--sites", str(spec)]) == 0
    assert read_metadata(guessed)["base"] == read_metadata(from_json)["base"]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad.safetensors"), "--sites", "no-such-spec"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("adapterkit train: error: --sites must be 'guess', a JSON SiteSpec or a JSON file") and err.count("\n") == 1
    assert not (tmp_path / "bad.safetensors").exists()


def test_serve_load_base_takes_sites(tiny_bert):
    from adapterkit.serve.runner import load_base
    from adapterkit.sites import parse_sites

    model, _ = load_base(tiny_bert, "encoder", sites=parse_sites("guess"))
    assert model.num_layers == 2 and "attention.output.dense" in model.sites_report()
    bogus = '{"layers": ["encoder.layer"], "attn_out": ["no.such.module"], "ffn_in": ["intermediate"], "ffn_out": ["output.dense"], "norms": []}'
    with pytest.raises(ValueError, match="no.such.module|attn_out"):
        load_base(tiny_bert, "encoder", sites=parse_sites(bogus))


KINDS_DDP_SCRIPT = '''
import json, sys
import torch
import adapterkit.train as T
from adapterkit import AdapterConfig, AdapterModel
from adapterkit.data import load_task
from transformers import AutoModel, AutoTokenizer

folder, train_path, val_path, out, config = sys.argv[1:6]
torch.set_num_threads(1)
train, val = load_task(train_path), load_task(val_path)
# no dropout: one process on 16 rows and two on 8 each then take the same steps, up to float rounding
model = AdapterModel(AutoModel.from_pretrained(folder, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
torch.manual_seed(0)
model.add_adapter("s", AdapterConfig(**json.loads(config)), head="classification", labels=train.labels, head_dropout=0.0)
T.fit(model, "s", train, val, AutoTokenizer.from_pretrained(folder), out,
      T.TrainConfig(epochs=1, lr=1e-3, batch_size=16, progress=False))
'''


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dora", "ia3"])
def test_ddp_trains_lora_dora_and_ia3_as_one_process_does(tmp_path, tiny_bert, kind):
    """DDP takes every kind unchanged: two processes (8 rows each) end where one process (16 rows) does,
    every tensor of the adapter (DoRA's magnitudes, IA3's scales) within float rounding."""
    script = tmp_path / "ddp_kinds.py"
    script.write_text(KINDS_DDP_SCRIPT)
    data = [write_jsonl(tmp_path / "train.jsonl", make_sentiment(64, 0)), write_jsonl(tmp_path / "val.jsonl", make_sentiment(16, 1))]
    args = [str(script), str(tiny_bert), *map(str, data)]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    one, two = tmp_path / "one" / "s.safetensors", tmp_path / "two" / "s.safetensors"
    config = json.dumps(KIND_CONFIGS[kind])
    proc = _run_group([sys.executable, *args, str(one), config], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args, str(two),
                       config], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_artifact(one).tensors, read_artifact(two).tensors
    fresh = AdapterModel(AutoModel.from_pretrained(tiny_bert))
    torch.manual_seed(0)
    start = fresh.add_adapter("s", AdapterConfig(**KIND_CONFIGS[kind]), head="classification", labels=["neg", "pos"])
    assert set(a) == set(b) and any(not torch.equal(a[k], v) for k, v in start.state_dict().items())  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=k)
