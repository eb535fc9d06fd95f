"""The README.md adapter card that ``adapterkit export`` writes beside an exported folder.

Built from the artifact's metadata alone. The base model is named by a portable id (a Hugging Face
Hub id such as ``org/name``); a local path never goes into the card: when only one is known, the card
says the base is unknown and gives the folder's base name and the base fingerprint instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import PurePath
from typing import Any

# A Hugging Face Hub model id: "name" or "org/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

_LIBRARY = {"peft": ("PEFT", "peft"), "adapters": ("the adapters library (AdapterHub)", "adapter-transformers")}
_AUTO = {"classification": "AutoModelForSequenceClassification", "token_classification": "AutoModelForTokenClassification"}


def portable_id(name: str | os.PathLike | None) -> str | None:
    """``name`` when it is a Hub id that means the same on any machine; None for a local path (absolute,
    relative to the working folder, or an existing folder) or nothing."""
    if name is None:
        return None
    text = str(name).strip()
    if not text or text.startswith((".", "~")) or "\\" in text or os.path.isabs(text) or os.path.exists(text):
        return None
    return text if _HUB_ID.match(text) and ".." not in text else None


def exported_base_id(model: Any) -> str | None:
    """The base model id an exported config may name: the base's ``_name_or_path`` when it is a portable
    Hub id, else None. A local path (where the base was loaded from on this machine) means nothing on
    another one and leaks the machine's folder layout; PEFT and the adapters library both load an adapter
    with the field null (neither reads it to find the base)."""
    return portable_id(getattr(getattr(model, "config", None), "_name_or_path", None))


def base_name(path: str | None) -> str:
    """The last part of a local path (``/home/me/models/tiny-bert`` -> ``tiny-bert``); never the path."""
    text = str(path or "").rstrip("/\\")
    return PurePath(text.replace("\\", "/")).name if text else ""


def card_base_id(meta: dict[str, Any], given: str | None = None) -> str | None:
    """The base model's portable id: ``given`` (the ``--base`` of the export) if portable, else the one
    the artifact's fingerprint names, else the one its conversion source recorded; None if none is."""
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    for candidate in (given, meta.get("base", {}).get("name_or_path"), source.get("base_model")):
        found = portable_id(candidate)
        if found:
            return found
    return None


def adapter_card(meta: dict[str, Any], to: str, folder_name: str, base_id: str | None) -> str:
    """The card (Markdown with a YAML header) for artifact metadata ``meta`` exported as format ``to``
    into a folder named ``folder_name``; ``base_id`` from ``card_base_id``."""
    library, library_tag = _LIBRARY[to]
    name, config, task = meta["name"], dict(meta.get("config") or {}), dict(meta.get("task") or {})
    fp = dict(meta.get("base") or {})
    kind = config.get("kind", "?")
    lines = ["---", f"library_name: {library_tag}"]
    if base_id:
        lines.append(f"base_model: {base_id}")
    lines += ["tags:", "- adapterkit", f"- {kind}", "---", "", f"# {name}", ""]
    fp_text = (f"fingerprint `{fp.get('id', '?')}`: model_type `{fp.get('model_type', '?')}`, hidden size "
               f"{fp.get('hidden_size', '?')}, {fp.get('num_layers', '?')} layers")
    if base_id:
        base_line = f"`{base_id}` ({fp_text})."
    else:
        local = base_name(fp.get("name_or_path")) or base_name((meta.get("source") or {}).get("base_folder"))
        where = f" (a local folder named `{local}`)" if local else ""
        base_line = (f"unknown: the adapter was made on a base model loaded from a local path{where}; use the "
                     f"model with {fp_text}. adapterkit checks this fingerprint when it loads the adapter.")
    lines += [f"A **{kind}** adapter exported by adapterkit {meta.get('library_version', '')} for {library}.", "",
              f"**Base model**: {base_line}", ""]
    if meta.get("description"):
        lines += [str(meta["description"]), ""]
    lines += ["## Task", "", f"- type: `{task.get('type', 'none')}`"]
    labels = task.get("labels") or []
    if labels:
        lines.append(f"- labels ({len(labels)}, in logit order): {', '.join(f'`{label}`' for label in labels)}")
    lines += ["", "## Adapter config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, int | float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
        lines.append("")
    source = meta.get("source") or {}
    if source.get("format"):
        origin = f" `{source['source']}`" if source.get("source") else ""
        version = f" {source['version']}" if source.get("version") else ""
        lines += ["## Provenance", "", f"Converted to adapterkit from a {source['format']}{version} checkpoint{origin}.", ""]
    lines += ["## Usage", "", "```python", _usage(to, task.get("type"), len(labels), folder_name, base_id), "```", ""]
    return "\n".join(lines)


def _usage(to: str, head: str | None, num_labels: int, folder: str, base_id: str | None) -> str:
    base = json.dumps(base_id) if base_id else '"BASE_MODEL"'
    path = json.dumps(f"./{folder}")
    auto = _AUTO.get(head or "")
    note = [] if base_id else ["# BASE_MODEL: the base model described above (its fingerprint must match)"]
    return "\n".join(note + _snippet(to, head, auto, num_labels, base, path))


def _snippet(to: str, head: str | None, auto: str | None, num_labels: int, base: str, path: str) -> list[str]:
    if to == "peft":
        load = f"{auto}.from_pretrained({base}, num_labels={num_labels})" if auto else f"AutoModel.from_pretrained({base})"
        return [
            "from peft import PeftModel",
            f"from transformers import {auto or 'AutoModel'}",
            "",
            f"base = {load}",
            f"model = PeftModel.from_pretrained(base, {path}).eval()",
        ]
    if head in _AUTO:
        return [
            "from adapters import AutoAdapterModel",
            "",
            f"model = AutoAdapterModel.from_pretrained({base})",
            f"name = model.load_adapter({path}, use_safetensors=True)  # the adapter and its head",
            "model.set_active_adapters(name)",
        ]
    return [
        "import adapters",
        "from transformers import AutoModel",
        "",
        f"model = AutoModel.from_pretrained({base})",
        "adapters.init(model)",
        f"name = model.load_adapter({path}, use_safetensors=True)",
        "model.set_active_adapters(name)",
    ]
