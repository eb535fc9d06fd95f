"""``adapterkit hub push`` of a PEFT / adapters-library folder (converted on the way in by the code
``adapterkit convert`` runs), and how an adapter's page names its base model and source format.

Real PEFT and adapters-library folders on a tiny random BERT saved to disk (so the only base name known
is a local folder); outputs compared with the source library's in eval mode within 1e-5."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx
import pytest
import torch
from hub_testing import Server, fingerprint, make_artifact
from tinymodels import TINY, tiny_inputs

from adapterkit import AdapterModel
from adapterkit.artifact import read_metadata
from adapterkit.hub.cli import main as hub_main
from adapterkit.hub.registry import LocalRegistry

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoConfig, BertModel  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("push-base") / "tiny-bert-local"
    torch.manual_seed(0)
    BertModel(AutoConfig.for_model("bert", **TINY["bert"][0])).save_pretrained(path)
    return path


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random adapter and head weights, so every converted tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name or ".adapters." in name or name.startswith("heads."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _out(output) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


@pytest.fixture(scope="module")
def peft_folder(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    folder = tmp_path_factory.mktemp("peft-src") / "my-lora"
    model = get_peft_model(BertModel.from_pretrained(base_dir), LoraConfig(
        target_modules=["query", "value"], r=4, lora_alpha=8, init_lora_weights=False)).eval()
    _randomize(model)
    model.save_pretrained(folder)
    with torch.no_grad():
        return folder, _out(model(**tiny_inputs("bert")))


def _ours(base_dir: Path, artifact: Path) -> torch.Tensor:
    model = AdapterModel(BertModel.from_pretrained(base_dir)).eval()
    name = model.load_adapter(artifact)
    with torch.no_grad():
        return _out(model(**tiny_inputs("bert"), adapter_names=name))


def _facts(page: str) -> dict[str, str]:
    """The adapter page's facts with an id (``<dd id=...>``, ``<span id=...>``) as plain text."""
    return {k: " ".join(html.unescape(re.sub(r"<[^>]+>", "", v)).split())
            for _, k, v in re.findall(r'<(dd|span) id="([\w-]+)">(.*?)</\1>', page, re.S)}


def test_push_a_peft_folder_to_a_local_registry(tmp_path: Path, base_dir: Path, peft_folder, capsys) -> None:
    folder, expected = peft_folder
    root = tmp_path / "reg"
    assert hub_main(["push", str(folder), "lab/lora", "--base", str(base_dir), "--registry", str(root)]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and "(peft)" in out and "published lab/lora@1" in out
    reg = LocalRegistry(root)
    info = reg.info("lab/lora")
    assert info.source_format == "peft" and info.source["peft_type"] == "LORA"
    assert info.name_or_path == "" and info.base_model_id == ""  # only a local folder was known
    assert info.base_label == f"unknown base (folder {base_dir.name}, fingerprint {info.base_id})"
    artifact = reg.download("lab/lora@1")
    meta = read_metadata(artifact)
    assert meta["name"] == "lora"  # PEFT saves no name: the reference's
    assert str(base_dir) not in str(meta) and str(folder.parent) not in str(meta)
    torch.testing.assert_close(_ours(base_dir, artifact), expected, atol=TOL, rtol=0)
    assert not list(root.glob("tmp/*"))  # the converted temp file is gone, no upload left over


def test_push_a_peft_folder_to_the_server_shows_its_format(hub_server: Server, base_dir: Path, peft_folder) -> None:
    folder, _ = peft_folder
    argv = ["push", str(folder), "push-peft/lora", "--base", str(base_dir), "--json",
            "--registry", hub_server.url, "--token", hub_server.tokens["alice"]]
    assert hub_main(argv) == 0
    page = httpx.get(hub_server.url + "/adapters/push-peft/lora").text
    facts = _facts(page)
    assert facts["source-format"] == f"peft (converted to adapterkit; source version {peft.__version__})"
    assert facts["base-model"].startswith(f"unknown base (folder {base_dir.name}, fingerprint bert-32x2-")
    assert str(base_dir) not in page and str(folder) not in page


def test_push_folder_errors_publish_nothing(tmp_path: Path, base_dir: Path, peft_folder, capsys) -> None:
    folder, _ = peft_folder
    root = tmp_path / "reg"
    other = tmp_path / "not-an-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text('{"something": "else"}')
    for argv, why in (
        (["push", str(folder), "lab/x", "--registry", str(root)], "give --base"),
        (["push", str(other), "lab/x", "--base", str(base_dir), "--registry", str(root)], "not a PEFT or adapters-library folder"),
        (["push", str(folder), "lab/a/b", "--base", str(base_dir), "--registry", str(root)], "exactly one '/'"),
    ):
        assert hub_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and why in err and err.count("\n") == 1, err
    assert not root.exists() or LocalRegistry(root).search() == []


def test_push_an_adapters_library_folder_through_the_server(hub_server: Server, tmp_path: Path, base_dir: Path, capsys) -> None:
    adapters = pytest.importorskip("adapters")  # installed in the transformers 4.57 environment only
    source = adapters.AutoAdapterModel.from_pretrained(base_dir)
    source.add_adapter("topic", config=adapters.DoubleSeqBnConfig(reduction_factor=8))
    source.add_classification_head("topic", num_labels=3)
    _randomize(source)
    source.set_active_adapters("topic")
    with torch.no_grad():
        expected = _out(source.eval()(**tiny_inputs("bert")))
    source.save_adapter(str(tmp_path / "src"), "topic")
    argv = ["push", str(tmp_path / "src"), "push-foreign/topic", "--base", str(base_dir),
            "--registry", hub_server.url, "--token", hub_server.tokens["alice"]]
    assert hub_main(argv) == 0
    assert "published push-foreign/topic@1" in capsys.readouterr().out
    page = httpx.get(hub_server.url + "/adapters/push-foreign/topic").text
    facts = _facts(page)
    assert facts["source-format"] == f"adapters (converted to adapterkit; source version adapters.{adapters.__version__})"
    assert facts["base-model"].startswith(f"unknown base (folder {base_dir.name}, fingerprint bert-")
    assert str(base_dir) not in page and str(tmp_path) not in page
    with httpx.Client() as client:
        data = client.get(hub_server.url + "/api/adapters/push-foreign/topic/versions/1/file").content
    (tmp_path / "got.safetensors").write_bytes(data)
    assert read_metadata(tmp_path / "got.safetensors")["name"] == "topic"  # the name the library saved
    torch.testing.assert_close(_ours(base_dir, tmp_path / "got.safetensors"), expected, atol=TOL, rtol=0)


def test_page_names_the_base_by_hub_id_never_by_local_path(hub_server: Server, tmp_path: Path) -> None:
    token = ["--registry", hub_server.url, "--token", hub_server.tokens["alice"]]
    local = str(tmp_path / "models" / "my-bert")  # as save_adapter records a base loaded from a folder
    cases = {
        "by-id": (fingerprint(name="acme/tiny-bert"), "acme/tiny-bert"),
        "by-path": (fingerprint(name=local), "unknown base (folder my-bert, fingerprint {id})"),
        "nothing": (fingerprint(name=""), "unknown base (fingerprint {id})"),
    }
    for i, (name, (fp, shown)) in enumerate(cases.items()):
        art = make_artifact(tmp_path / f"{name}.safetensors", seed=200 + i, base=fp)
        assert hub_main(["push", str(art), f"push-names/{name}", *token]) == 0
        page = httpx.get(f"{hub_server.url}/adapters/push-names/{name}").text
        facts = _facts(page)
        assert facts["base-model"] == shown.format(id=fp["id"]), facts
        assert facts["source-format"] == "adapterkit"
        assert local not in page
        if name == "by-id":
            assert "AutoModel.from_pretrained(&#39;acme/tiny-bert&#39;)" in page
        else:
            assert "AutoModel.from_pretrained(&#39;&lt;base model folder or id&gt;&#39;)" in page
    listing = httpx.get(hub_server.url + "/", params={"q": "push-names"}).text
    assert "acme/tiny-bert" in listing and local not in listing
