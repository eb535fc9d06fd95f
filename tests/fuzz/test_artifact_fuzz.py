"""Property-based fuzzing (Hypothesis) of the artifact reader: any bytes, and any corruption of a real
artifact, give an ``ArtifactError`` (or load, when the bytes are still a valid artifact) — never
another exception, and never an allocation sized by what the file claims."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinymodels import tiny_model

import adapterkit as ak
from adapterkit.artifact import ArtifactError, check_artifact_shapes, read_artifact, read_header
from adapterkit.hub.errors import InvalidArtifact
from adapterkit.hub.registry import check_artifact

SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def model_and_bytes() -> tuple[ak.AdapterModel, bytes]:
    model = ak.AdapterModel(tiny_model("bert"))
    model.add_adapter("sst", ak.AdapterConfig("houlsby", bottleneck_size=4), head="classification", labels=["a", "b"])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sst.safetensors"
        model.save_adapter("sst", path)
        data = path.read_bytes()
    model.delete_adapter("sst")
    return model, data


def _write(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def every_reader(model: ak.AdapterModel, data: bytes) -> None:
    """Run each reader on ``data``; only the documented errors may come out."""
    path = _write(data)
    try:
        for read in (
            lambda: read_header(path),
            lambda: read_artifact(path),
            lambda: check_artifact_shapes(path, model.hidden_size, [len(ls.norms) for ls in model.layer_sites], expected_base=model.fingerprint()),
            lambda: check_artifact(path),
        ):
            try:
                read()
            except (ArtifactError, InvalidArtifact, ak.BaseModelMismatch):
                pass
        try:
            name = model.load_adapter(path, name="fuzzed")
        except (ArtifactError, ak.BaseModelMismatch):
            pass
        else:
            model.delete_adapter(name)
    finally:
        path.unlink()


@SETTINGS
@given(data=st.binary(max_size=512))
def test_any_bytes(model_and_bytes, data: bytes) -> None:
    every_reader(model_and_bytes[0], data)


@SETTINGS
@given(st.data())
def test_any_corruption_of_a_real_artifact(model_and_bytes, data: st.DataObject) -> None:
    model, good = model_and_bytes
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    every_reader(model, bytes(blob[:cut]))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@SETTINGS
@given(st.data())
def test_any_header_with_real_tensor_data(model_and_bytes, data: st.DataObject) -> None:
    """A header rewritten with arbitrary JSON in place of each tensor entry and of the metadata."""
    model, good = model_and_bytes
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    key = data.draw(st.sampled_from(sorted(header)))
    header[key] = data.draw(JSON)
    if data.draw(st.booleans()):
        header["__metadata__"] = data.draw(JSON)
    raw = json.dumps(header).encode()
    every_reader(model, struct.pack("<Q", len(raw)) + raw + good[8 + n :])
