"""``hf:org/name[@revision]``: an adapter on the Hugging Face Hub, through ``huggingface_hub``'s cache.

``snapshot_download`` fetches the repository once into the cache (or, with ``HF_HUB_OFFLINE=1``,
finds it there); the snapshot is a PEFT or adapters-library folder, or holds one adapterkit artifact.
"""

from __future__ import annotations

import re
from pathlib import Path

from .module_map import InteropError

_REF = re.compile(r"^hf:(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def parse_hf(reference: str) -> tuple[str, str | None]:
    """``"hf:org/name@rev"`` -> (``"org/name"``, ``"rev"`` or None)."""
    m = _REF.match(reference)
    if not m:
        raise InteropError(f"not a Hugging Face reference {reference!r}; expected hf:org/name or hf:org/name@revision")
    return m.group("repo"), m.group("rev")


def resolve_hf(reference: str) -> Path:
    """The local path of ``reference``: the snapshot folder (holding ``adapter_config.json``) or the
    one ``.safetensors`` artifact in it."""
    repo, revision = parse_hf(reference)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise InteropError("hf: references need huggingface_hub (pip install huggingface_hub)") from e
    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision))
    except Exception as e:  # offline with nothing cached, unknown repo or revision, network errors
        raise InteropError(f"{reference}: cannot get it from the Hugging Face Hub or its cache ({type(e).__name__}: {e})") from None
    if (folder / "adapter_config.json").is_file():
        return folder
    artifacts = sorted(folder.glob("*.safetensors"))
    if len(artifacts) == 1:
        return artifacts[0]
    raise InteropError(f"{reference}: the snapshot {folder} holds neither adapter_config.json nor exactly one .safetensors "
                       f"artifact (found {[a.name for a in artifacts]})")
