"""Issue 15, finding 1, in user code: an artifact whose metadata claims more than its tensors hold is
refused from its header, before anything is allocated for it.

Allocation is observed, not guessed: a TorchDispatchMode sees every tensor an operator creates while
``load_adapter`` runs (module construction included), and sums their bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from allocations import AllocatedBytes
from safetensors import safe_open
from safetensors.torch import save
from tinymodels import tiny_model

import adapterkit as ak
from adapterkit.artifact import METADATA_KEY, ArtifactError


@pytest.fixture(scope="module")
def model_and_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[ak.AdapterModel, Path]:
    model = ak.AdapterModel(tiny_model("bert"))
    model.add_adapter("sst", ak.AdapterConfig("houlsby", bottleneck_size=8), head="classification", labels=["neg", "pos"])
    path = tmp_path_factory.mktemp("limits") / "sst.safetensors"
    model.save_adapter("sst", path)
    model.delete_adapter("sst")
    return model, path


def rewrite(src: Path, dest: Path, edit) -> Path:
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        doc = json.loads(f.metadata()[METADATA_KEY])
    edit(doc)
    dest.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(doc)}))
    return dest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # a bottleneck of 8000 on hidden 32: ~8 MB of modules for a ~20 kB file
        (lambda d: d["config"].update(bottleneck_size=8000), "tensor shapes do not match"),
        (lambda d: d["config"].update(bottleneck_size=None, reduction_factor=0.001), "over the cap"),
        (lambda d: (d["task"].update(labels=[f"l{i}" for i in range(40000)]), d["head"].update(num_labels=40000)), "labels; at most"),
    ],
    ids=["bottleneck-claimed", "reduction-factor-over-cap", "labels-over-cap"],
)
def test_metadata_claims_are_refused_before_anything_is_allocated(model_and_artifact, tmp_path: Path, edit, message: str) -> None:
    model, good = model_and_artifact
    bomb = rewrite(good, tmp_path / "bomb.safetensors", edit)
    counter = AllocatedBytes()
    with counter, pytest.raises(ArtifactError, match=message):
        model.load_adapter(bomb, name="bomb")
    # What is allowed: the base fingerprint's strided samples (sized by the model, ~150 kB here);
    # building the claimed modules would be ~8 MB (and was 170 MB for the three cases before the fix).
    assert counter.bytes < 1 << 20, f"{counter.bytes} bytes allocated for a refused {bomb.stat().st_size}-byte file"
    assert model.list_adapters() == []
    # The honest file still loads.
    assert model.load_adapter(good, name="ok") == "ok"
    model.delete_adapter("ok")
