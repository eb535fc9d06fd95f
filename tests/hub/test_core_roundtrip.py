"""A real adapter from the core, pushed to the server and loaded by reference in another process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_testing import Server

from adapterkit.artifact import read_artifact
from adapterkit.hub import RemoteRegistry

BUILD_BASE = """
import torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
base = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_push_then_load_adapter_by_reference_in_another_process(hub_server: Server, tmp_path: Path) -> None:
    from adapterkit import AdapterConfig, AdapterModel

    scope: dict = {}
    exec(BUILD_BASE, scope)  # the same tiny, seeded base model the other process builds
    model = AdapterModel(scope["base"])
    model.add_adapter("spam", AdapterConfig("houlsby", bottleneck_size=8), head="classification", labels=["ham", "spam"])
    saved = model.save_adapter("spam", tmp_path / "spam.safetensors", metrics={"accuracy": 0.9})
    with RemoteRegistry(hub_server.url, hub_server.tokens["alice"], cache_dir=tmp_path / "cache") as reg:
        info = reg.publish(saved, "core-team/sms-spam", base=model.fingerprint())
    assert (info.kind, info.bottleneck_size, info.labels, info.metrics) == ("houlsby", 8, ["ham", "spam"], {"accuracy": 0.9})

    out = tmp_path / "reloaded.safetensors"
    script = BUILD_BASE + textwrap.dedent(f"""
        from adapterkit import AdapterModel
        model = AdapterModel(base)
        name = model.load_adapter("hub:core-team/sms-spam@1")
        model.save_adapter(name, {str(out)!r})
    """)
    env = {**os.environ, "ADAPTERKIT_REGISTRY": hub_server.url, "ADAPTERKIT_HOME": str(tmp_path / "other-home")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    original, reloaded = read_artifact(saved), read_artifact(out)
    assert original.tensors is not None and reloaded.tensors is not None
    assert original.tensors.keys() == reloaded.tensors.keys()
    for key, tensor in original.tensors.items():
        assert torch.equal(tensor, reloaded.tensors[key]), key
    assert any((tmp_path / "other-home" / "remote-cache" / "blobs").rglob("*"))  # it came through the hub
