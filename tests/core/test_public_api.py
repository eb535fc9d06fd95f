"""The README's public API table holds: every name it shows imports from ``adapterkit`` or is a method
of ``AdapterModel``, and every parameter it shows is in that callable's signature (or a field of that
class). Parsed from README.md itself, so the table and the code cannot drift apart silently."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import re

import adapterkit
from adapterkit import AdapterModel

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
CALL = re.compile(r"(?:model\.)?\b([A-Za-z_][A-Za-z0-9_]*)\(([^`]*)\)")


def _api_rows() -> list[tuple[str, str]]:
    text = README.read_text(encoding="utf-8")
    table = text.split("## Public API", 1)[1].split("\n## ", 1)[0]
    rows = [re.split(r"(?<!\\)\|", line)[1:3] for line in table.splitlines() if line.startswith("| `")]
    return [(call.strip(), what.strip()) for call, what in rows]


def _calls(cell: str) -> list[tuple[str, list[str]]]:
    """(name, parameter names) of each ``call(...)`` in a cell's code spans; ``model(...)`` is forward."""
    found = []
    for span in re.findall(r"`([^`]+)`", cell):
        for name, args in CALL.findall(span):
            params = [re.split(r"[=\s]", a.strip())[0] for a in re.split(r"[,|]", args) if not a.strip().startswith("*")]
            found.append(("forward" if name == "model" else name, [p for p in params if p.isidentifier()]))
    return found


def _parameters(obj: object) -> set[str]:
    names = set(inspect.signature(obj).parameters)
    if dataclasses.is_dataclass(obj):
        names |= {f.name for f in dataclasses.fields(obj)}
    return names | {n for n, v in vars(obj).items() if isinstance(v, property)} if isinstance(obj, type) else names


def test_every_name_and_parameter_of_the_readme_api_table_exists():
    rows = _api_rows()
    assert len(rows) >= 10, "README.md's public API table was not found"
    seen_classes, seen_methods = set(), set()
    for call, what in rows:
        for name, params in _calls(call) + [c for c in _calls(what) if c[0][0].isupper()]:
            if name[0].isupper():  # a class: importable from the package, listed in __all__
                assert name in adapterkit.__all__, f"README names {name}, which adapterkit does not export"
                obj = getattr(adapterkit, name)
                seen_classes.add(name)
            else:  # a method of AdapterModel
                assert callable(getattr(AdapterModel, name, None)), f"README names AdapterModel.{name}, which does not exist"
                obj = getattr(AdapterModel, name)
                seen_methods.add(name)
            missing = [p for p in params if p not in _parameters(obj)]
            assert not missing, f"README shows {name}({', '.join(params)}); {name} has no {missing}"
    assert {"AdapterModel", "AdapterConfig", "SiteSpec", "AdapterOutput", "ParameterReport"} <= seen_classes
    assert {"add_adapter", "delete_adapter", "list_adapters", "adapter_info", "labels", "set_active_adapter",
            "route", "forward", "generate", "train_adapter", "train_full", "trainable_parameters", "save_adapter",
            "load_adapter", "detach"} <= seen_methods


def test_the_package_exports_what_it_lists():
    for name in adapterkit.__all__:
        assert getattr(adapterkit, name) is not None, name
