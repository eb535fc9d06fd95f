"""AdapterFusion: the ``Fuse`` block per row, its reference formula, training, and its artifact.

The reference is independent of the routing code: hand-made hooks on the bare base that compute
q = out W_q, k_m = r_m W_k, v_m = r_m W_v, softmax over members, Σ s_m v_m from each member module's
plain ``forward`` (the bottleneck's delta). Per-row checks compare a row of a batch with that row
alone (max abs diff <= 1e-5).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save
from tinymodels import tiny_inputs, tiny_model

from adapterkit import AdapterConfig, AdapterModel, ArtifactError, Average, BaseModelMismatch, Stack
from adapterkit.composition import Fuse
from adapterkit.fusion import member_digest

TOL = 1e-5


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # far from the initial state, so that mistakes show
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _row(inputs: dict, i: int) -> dict:
    row = {k: v[i : i + 1] for k, v in inputs.items()}
    if "attention_mask" in row:
        n = int(row["attention_mask"].sum())
        row = {k: (v[:, :n] if k in ("input_ids", "attention_mask") else v) for k, v in row.items()}
    return row


def _mixed_model(model_type: str) -> AdapterModel:
    """Members of three kinds (a bottleneck, LoRA on q/v/down, IA3: fusion layers of several widths)
    and three fusions, all far from their initial values."""
    model = AdapterModel(tiny_model(model_type))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=6, train_layer_norms=False))
    model.add_adapter("b", AdapterConfig("lora", bottleneck_size=4, targets=["q", "v", "down"]))
    model.add_adapter("c", AdapterConfig("ia3"))
    _randomise(model.adapters, 0)
    for i, (name, members) in enumerate([("ab", ["a", "b"]), ("ab2", ["a", "b"]), ("abc", ["a", "b", "c"])]):
        _randomise(model.add_fusion(name, members), 10 + i)
    return model.eval()


ROWS = [
    Fuse("a", "b", fusion="ab"),
    "a",
    None,
    Stack("a", "b"),
    Fuse("a", "b", "c", fusion="abc"),
    Fuse("a", "b", fusion="ab2"),  # same members, another fusion: another group
    Stack("c", Fuse("a", "b", fusion="ab")),  # nested: allowed
    Average(Fuse("b", "a", fusion="ab"), "c"),  # the members in another order: the same fusion
]


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("grad", [False, True])
def test_fuse_per_row_equals_each_row_alone(model_type, grad):
    model = _mixed_model(model_type)
    inputs = tiny_inputs(model_type, batch=len(ROWS))
    with torch.set_grad_enabled(grad):
        mixed = _out(model(**inputs, adapter_names=ROWS))
        alone = []
        for i, entry in enumerate(ROWS):
            one = _out(model(**_row(inputs, i), adapter_names=[entry]))
            n = one.shape[1]
            diff = (mixed[i, :n] - one[0]).abs().max().item()
            assert diff <= TOL, (model_type, i, entry, diff)
            alone.append(one)
        row0 = _row(inputs, 0)
        n = alone[0].shape[1]
        others = {
            "a": _out(model(**row0, adapter_names=["a"])),
            "average": _out(model(**row0, adapter_names=[Average("a", "b")])),
            "ab2": _out(model(**row0, adapter_names=[Fuse("a", "b", fusion="ab2")])),
            "nested": _out(model(**row0, adapter_names=[Stack("c", Fuse("a", "b", fusion="ab"))])),
        }
        for label, other in others.items():  # the fused row is none of these
            assert (other[0, :n] - alone[0][0]).abs().max().item() > 1e-3, label
        swapped = _out(model(**row0, adapter_names=[Fuse("b", "a", fusion="ab")]))
        assert (swapped - alone[0]).abs().max().item() <= TOL  # the formula is symmetric in the members


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("beams", [1, 3])
def test_fuse_per_row_in_generate(model_type, beams):
    model = _mixed_model(model_type)
    rows = [Fuse("a", "b", fusion="ab"), "a", None, Stack("a", "b"), Fuse("a", "b", "c", fusion="abc")]
    prompts = tiny_inputs(model_type, batch=len(rows), seq=5)
    prompts["attention_mask"] = torch.ones_like(prompts["input_ids"])  # equal lengths: no padding side
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    together = model.generate(**prompts, adapter_names=rows, **kwargs)
    outputs = set()
    for i, entry in enumerate(rows):
        alone = model.generate(**_row(prompts, i), adapter_names=[entry], **kwargs)
        n = alone.shape[1]  # a row alone may stop sooner (end of sequence): the batch pads it
        assert torch.equal(together[i, :n], alone[0]), (i, entry)
        outputs.add(tuple(alone[0].tolist()))
    assert len(outputs) > 1
    fused = model.generate(**_row(prompts, 0), adapter_names=[rows[0]], **kwargs)
    plain = model.generate(**_row(prompts, 0), adapter_names=["a"], **kwargs)
    assert not torch.equal(fused, plain)


# -- the formula, by hand ------------------------------------------------------------------------


def _bottleneck_model(model_type: str) -> AdapterModel:
    model = AdapterModel(tiny_model(model_type))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=6, train_layer_norms=False))
    model.add_adapter("b", AdapterConfig("pfeiffer", bottleneck_size=4, train_layer_norms=False))
    model.add_adapter("c", AdapterConfig("houlsby", bottleneck_size=3, train_layer_norms=False))
    _randomise(model.adapters, 0)
    return model.eval()


def _reference(model: AdapterModel, fusion_name: str, inputs: dict) -> torch.Tensor:
    """The bare base with hooks at each fusion site: r_m = out + delta_m(out) (out where member m has
    no module), then the fusion formula written out member by member."""
    fusion = model.fusions[fusion_name]
    adapters = [model.adapters[n] for n in fusion.members]
    temperature = fusion.temperature
    handles = []

    def combine(out, site, modules):
        rs = [out if m is None else out + m(out) for m in modules]
        q = out @ site.query
        keys = [r @ site.key for r in rs]
        values = [r @ site.value for r in rs]
        s = torch.softmax(torch.stack([(q * k).sum(-1) for k in keys]) / temperature, dim=0)  # (M, B, T)
        return sum(s[i].unsqueeze(-1) * values[i] for i in range(len(rs)))

    for ls in model.layer_sites:
        for position, role in (("attn", "attn_out"), ("ffn", "ffn_out")):
            site = fusion.site(ls.index, position)
            assert (site is None) == all(a.site(ls.index, position) is None for a in adapters)
            if site is None:
                continue
            modules = [a.site(ls.index, position) for a in adapters]
            handles.append(getattr(ls, role).register_forward_hook(
                lambda m, args, out, site=site, modules=modules: combine(out, site, modules)))
    try:
        return _out(model(**inputs, adapter_names=[None] * inputs["input_ids"].shape[0]))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("model_type", ["bert", "llama"])
@pytest.mark.parametrize("grad", [False, True])
def test_fuse_equals_the_formula_by_hand(model_type, grad):
    model = _bottleneck_model(model_type)
    inputs = tiny_inputs(model_type, batch=3)
    with torch.set_grad_enabled(grad):
        fresh = model.add_fusion("fresh", ["a", "b", "c"])
        # W_q = 0: every score is 0, so a fresh fusion is exactly the members' average
        ours = _out(model(**inputs, adapter_names=Fuse("a", "b", "c", fusion="fresh")))
        average = _out(model(**inputs, adapter_names=Average("a", "b", "c")))
        assert (ours - average).abs().max().item() <= TOL
        assert (ours - _reference(model, "fresh", inputs)).abs().max().item() <= TOL
        assert fresh.site(0, "attn") is not None and fresh.site(0, "q") is None
        for name, temperature in (("f1", 1.0), ("f2", 2.5)):
            _randomise(model.add_fusion(name, ["a", "b", "c"], temperature=temperature), 3)
            ours = _out(model(**inputs, adapter_names=Fuse("a", "b", "c", fusion=name)))
            ref = _reference(model, name, inputs)
            assert (ours - ref).abs().max().item() <= TOL, (name, (ours - ref).abs().max().item())
            assert (ours - average).abs().max().item() > 1e-3
        t1 = _out(model(**inputs, adapter_names=Fuse("a", "b", "c", fusion="f1")))
        t2 = _out(model(**inputs, adapter_names=Fuse("a", "b", "c", fusion="f2")))
        assert (t1 - t2).abs().max().item() > 1e-4  # same weights, another temperature


# -- training ------------------------------------------------------------------------------------


def _task_model() -> AdapterModel:
    model = AdapterModel(tiny_model("bert"))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=4, train_layer_norms=False),
                      head="classification", labels=["x", "y"])
    model.add_adapter("b", AdapterConfig("lora", bottleneck_size=4))
    _randomise(model.adapters, 0)
    return model


def test_training_a_fusion_leaves_its_members_untouched():
    model = _task_model()
    fusion = model.add_fusion("f", ["a", "b"], head="classification", labels=["n", "y", "m"])
    report = model.train_fusion("f")
    assert report.trainable == sum(p.numel() for p in fusion.parameters())
    assert model.active_adapter == Fuse("a", "b", fusion="f")
    model.train()
    inputs = tiny_inputs("bert", batch=4)
    labels = torch.tensor([0, 1, 2, 1])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    members = [p for n in ("a", "b") for p in model.adapters[n].parameters()]
    before = [p.detach().clone() for p in members]
    query_before = fusion.site(0, "attn").query.detach().clone()
    losses = []
    for _ in range(10):
        loss = model(**inputs, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in members)
        assert fusion.site(0, "attn").query.grad.abs().sum() > 0  # W_q learns from the first step
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(x, p) for x, p in zip(before, members))
    assert not torch.equal(query_before, fusion.site(0, "attn").query)
    model.eval()
    with torch.no_grad():
        active = model(**inputs).logits
        named = model(**inputs, adapter_names=Fuse("a", "b", fusion="f")).logits
    assert active.shape == (4, 3)  # the fusion's own head answers
    assert torch.equal(active, named)
    model.delete_fusion("f")
    assert model.active_adapter is None and model.list_fusions() == []


def test_a_fused_row_answers_with_the_fusions_head():
    model = _task_model()
    _randomise(model.add_fusion("f", ["a", "b"], head="classification", labels=["n", "y", "m"]), 5)
    model.eval()
    inputs = tiny_inputs("bert", batch=3)
    rows = [Fuse("a", "b", fusion="f"), "a", Stack("b", "a")]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=rows).logits
        assert mixed.shape == (3, 3)
        for i, entry in enumerate(rows):
            alone = model(**_row(inputs, i), adapter_names=[entry]).logits
            width = alone.shape[-1]
            assert width == (3 if i == 0 else 2)
            assert (mixed[i, :width] - alone[0]).abs().max().item() <= TOL
            assert torch.isinf(mixed[i, width:]).all()


# -- the artifact --------------------------------------------------------------------------------


def _saved(tmp_path):
    model = _task_model()
    _randomise(model.add_fusion("f", ["a", "b"], head="classification", labels=["n", "y", "m"]), 5)
    model.eval()
    for n in ("a", "b"):
        model.save_adapter(n, tmp_path / f"{n}.safetensors")
    path = model.save_fusion("f", tmp_path / "f.safetensors")
    return model, path


def _fresh(tmp_path, members=("a", "b"), seed: int = 0) -> AdapterModel:
    model = AdapterModel(tiny_model("bert", seed=seed)).eval()
    for n in members:
        model.load_adapter(tmp_path / f"{n}.safetensors", check_base=seed == 0)
    return model


def _header(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _rewrite(path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_fusion_artifact_round_trips(tmp_path):
    model, path = _saved(tmp_path)
    header, _ = _header(path)
    meta = json.loads(header["__metadata__"]["adapterkit"])
    assert meta["format"] == "adapterkit.fusion" and meta["name"] == "f"
    assert [m["name"] for m in meta["members"]] == ["a", "b"]
    assert [m["sha256"] for m in meta["members"]] == [member_digest(model.adapters[n]) for n in ("a", "b")]
    assert meta["base"] == model.fingerprint()
    other = _fresh(tmp_path)
    assert other.load_fusion(path, "g") == "g"
    inputs = tiny_inputs("bert", batch=3)
    with torch.no_grad():
        want = model(**inputs, adapter_names=Fuse("a", "b", fusion="f")).logits
        got = other(**inputs, adapter_names=Fuse("a", "b", fusion="g")).logits
    assert (want - got).abs().max().item() <= 1e-6
    assert (want[:, :2] - model(**inputs, adapter_names="a").logits).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="already loaded"):
        other.load_fusion(path, "g")


def test_load_fusion_refuses_missing_or_changed_members_and_another_base(tmp_path):
    _, path = _saved(tmp_path)
    missing = _fresh(tmp_path, members=("a",))
    with pytest.raises(ArtifactError, match="member 'b' is not loaded"):
        missing.load_fusion(path)
    changed = _fresh(tmp_path)
    with torch.no_grad():
        next(changed.adapters["b"].parameters()).add_(1e-3)
    with pytest.raises(ArtifactError, match="'b' differs from the one this fusion was trained with"):
        changed.load_fusion(path)
    other_base = _fresh(tmp_path, seed=1)
    with pytest.raises(BaseModelMismatch):
        other_base.load_fusion(path)
    other_base.load_fusion(path, check_base=False)  # the caller's call
    for m in (missing, changed):
        assert m.list_fusions() == []


def test_load_fusion_refuses_corrupt_truncated_and_lying_files(tmp_path):
    _, path = _saved(tmp_path)
    model = _fresh(tmp_path)
    data = path.read_bytes()
    header, body = _header(path)
    bad = tmp_path / "bad.safetensors"

    def refused(match: str) -> None:
        with pytest.raises(ArtifactError, match=match):
            model.load_fusion(bad)
        assert model.list_fusions() == []

    bad.write_bytes(data[: len(data) // 2])
    refused("truncated or corrupt")
    bad.write_bytes(b"\x00" * 7)
    refused("not a readable safetensors file")
    bad.write_bytes(struct.pack("<Q", 40) + b"{not json" + b" " * 31)
    refused("not valid JSON")
    # a tensor whose shape claims more bytes than its offsets span (nothing is allocated for it)
    lying = json.loads(json.dumps(header))
    lying["layers.0.attn.query"]["shape"] = [100000, 100000]
    _rewrite(bad, lying, body)
    refused("needs 40000000000 bytes")
    # consistent bytes, but a shape the members do not imply: checked before any tensor is read
    tensors = {k: torch.zeros(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    tensors["layers.0.attn.query"] = torch.zeros(4, 8)
    bad.write_bytes(save(tensors, metadata=header["__metadata__"]))
    refused("shapes do not match")
    tensors = {k: torch.zeros(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    tensors["layers.1.gate.query"] = torch.zeros(32, 32)  # a site no member acts at (bert has no gate)
    bad.write_bytes(save(tensors, metadata=header["__metadata__"]))
    refused("unexpected")
    # metadata that lies
    meta = json.loads(header["__metadata__"]["adapterkit"])
    for change, match in [
        ({"head": {**meta["head"], "num_labels": 7}}, "one output per label"),
        ({"members": meta["members"][:1]}, "2..16 objects"),
        ({"temperature": -1}, "temperature"),
        ({"format": "adapterkit.adapter"}, "expected 'adapterkit.fusion'"),
        ({"task": {"type": "classification", "labels": ["x"] * 40000}}, "at most 32768"),
    ]:
        lying = json.loads(json.dumps(header))
        lying["__metadata__"]["adapterkit"] = json.dumps({**meta, **change})
        _rewrite(bad, lying, body)
        refused(match)
    tensors = {k: torch.full(v["shape"], float("nan")) for k, v in header.items() if k != "__metadata__"}
    bad.write_bytes(save(tensors, metadata=header["__metadata__"]))
    refused("NaN")
    with pytest.raises(ArtifactError, match="expected 'adapterkit.fusion'"):
        model.load_fusion(tmp_path / "a.safetensors")  # an adapter, not a fusion


# -- invalid -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, error, match", [
    (Fuse("a", fusion="ab"), ValueError, "at least two members"),
    (Fuse("a", "b", fusion="nope"), KeyError, "unknown fusion 'nope'"),
    (Fuse("a", "c", fusion="ab"), ValueError, "fusion 'ab' fuses"),
    (Fuse("a", "b", "c", fusion="ab"), ValueError, "fusion 'ab' fuses"),
    (Fuse("a", Stack("b", "c"), fusion="ab"), TypeError, "Fuse members must be adapter names"),
    (Fuse("a", Fuse("a", "b", fusion="ab"), fusion="ab"), TypeError, "Fuse members must be adapter names"),
    (Fuse("a", "a", fusion="ab"), ValueError, "more than once"),
    (Fuse("a", "nope", fusion="ab"), KeyError, "unknown adapter 'nope'"),
])
def test_invalid_fuse_blocks_fail_clearly(bad, error, match):
    model = _mixed_model("bert")
    inputs = tiny_inputs("bert", batch=2)
    with pytest.raises(error, match=match):
        model(**inputs, adapter_names=bad)
    with pytest.raises(error, match=match):
        model(**inputs, adapter_names=[Stack("c", bad), "a"])
    with pytest.raises(error, match=match):
        model.set_active_adapter(bad)


def test_add_fusion_refuses_what_it_cannot_fuse():
    model = AdapterModel(tiny_model("llama"))
    model.add_adapter("a", AdapterConfig("houlsby", bottleneck_size=4, train_layer_norms=False))
    model.add_adapter("b", AdapterConfig("lora", bottleneck_size=4))
    model.add_adapter("normed", AdapterConfig("houlsby", bottleneck_size=4))  # trains layer norms by default
    model.add_adapter("p", AdapterConfig("prefix", bottleneck_size=4))
    with pytest.raises(ValueError, match="trains layer-norm affines"):
        model.add_fusion("f", ["a", "normed"])
    with pytest.raises(ValueError, match="KV cache"):
        model.add_fusion("f", ["a", "p"])
    with pytest.raises(ValueError, match="2 to 16 members"):
        model.add_fusion("f", ["a"])
    with pytest.raises(ValueError, match="more than once"):
        model.add_fusion("f", ["a", "a"])
    with pytest.raises(KeyError, match="unknown adapter 'x'"):
        model.add_fusion("f", ["a", "x"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model.add_fusion("f", "ab")
    with pytest.raises(ValueError, match="label names"):
        model.add_fusion("f", ["a", "b"], head="classification")
    with pytest.raises(ValueError, match="fusion name"):
        model.add_fusion("a.b", ["a", "b"])
    with pytest.raises(ValueError, match="Fuse needs the name of a fusion"):
        Fuse("a", "b", fusion="")
    assert model.list_fusions() == []
    model.add_fusion("f", ["a", "b"])
    with pytest.raises(ValueError, match="already loaded"):
        model.add_fusion("f", ["a", "b"])
    # a member deleted and added again with another layout: the fusion no longer fits it
    model.delete_adapter("b")
    with pytest.raises(KeyError, match="unknown adapter 'b'"):
        model.train_fusion("f")
    model.add_adapter("b", AdapterConfig("lora", bottleneck_size=4, targets=["k"]))
    with pytest.raises(ValueError, match="not the one this fusion was built over"):
        model(**tiny_inputs("llama", batch=1), adapter_names=Fuse("a", "b", fusion="f"))
