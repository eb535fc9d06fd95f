"""Tiny random models of every supported architecture (built from configs, as transformers' own tests do).

``TINY`` maps a ``model_type`` to its config kwargs and the auto class users load it with: decoders
with their LM head, encoder-decoders as seq2seq LMs, encoders and vision encoders bare. Every config
has 2 layers per stack, hidden size 32 and a 99-token vocabulary, so a model builds in milliseconds.
``ENCODERS`` / ``DECODERS`` / ``ENCODER_DECODERS`` are the small representative sets other tests
parametrize over; ``FAMILY`` puts every type of ``TINY`` in one of those families (or ``vision``).
"""

from __future__ import annotations

import importlib.util
import pathlib

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

torch.set_num_threads(1)  # tiny matrices: one thread; more only spin against other jobs on a busy machine

_BERT_DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99)
_DECODER_DIMS = dict(_BERT_DIMS, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
_HEAD8 = dict(_DECODER_DIMS, head_dim=8)
_GPT2_DIMS = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_SEQ2SEQ_DIMS = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=99, max_position_embeddings=64,
    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
)
_T5_DIMS = dict(d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8, vocab_size=99, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)
_VIT_DIMS = dict(_BERT_DIMS, image_size=32, patch_size=8)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=32)  # grouped-GEMM experts want 16-byte strides

LM, S2S, BARE = AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel

# model_type -> (config kwargs, auto class)
TINY: dict[str, tuple[dict, type]] = {
    # encoders
    "bert": (_BERT_DIMS, BARE),
    "roberta": (_BERT_DIMS, BARE),
    "xlm-roberta": (_BERT_DIMS, BARE),
    "xlm-roberta-xl": (_BERT_DIMS, BARE),
    "roberta-prelayernorm": (_BERT_DIMS, BARE),
    "camembert": (_BERT_DIMS, BARE),
    "data2vec-text": (_BERT_DIMS, BARE),
    "ernie": (_BERT_DIMS, BARE),
    "megatron-bert": (_BERT_DIMS, BARE),
    "electra": (dict(_BERT_DIMS, embedding_size=32), BARE),
    "distilbert": (dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99), BARE),
    "deberta": (_BERT_DIMS, BARE),
    "deberta-v2": (_BERT_DIMS, BARE),
    "mpnet": (_BERT_DIMS, BARE),
    "albert": (dict(_BERT_DIMS, embedding_size=16), BARE),
    "modernbert": (dict(_BERT_DIMS, global_attn_every_n_layers=2, local_attention=8, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), BARE),
    "rembert": (dict(_BERT_DIMS, input_embedding_size=16, output_embedding_size=16), BARE),
    # decoders
    "gpt2": (_GPT2_DIMS, LM),
    "gpt_bigcode": (_GPT2_DIMS, LM),
    "gptj": (dict(_GPT2_DIMS, rotary_dim=4), LM),
    "codegen": (dict(_GPT2_DIMS, rotary_dim=4, n_ctx=64), LM),
    "llama": (_DECODER_DIMS, LM),
    "mistral": (_DECODER_DIMS, LM),
    "mixtral": (dict(_DECODER_DIMS, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32), LM),
    "qwen2": (_DECODER_DIMS, LM),
    "qwen2_moe": (dict(_DECODER_DIMS | _MOE, shared_expert_intermediate_size=16), LM),
    "qwen3": (_HEAD8, LM),
    "qwen3_moe": (_HEAD8 | _MOE, LM),
    "gemma": (_HEAD8, LM),
    "gemma2": (_HEAD8, LM),
    "gemma3_text": (_HEAD8, LM),
    "phi": (_DECODER_DIMS, LM),
    "phi3": (_DECODER_DIMS, LM),
    "olmo": (_DECODER_DIMS, LM),
    "olmo2": (_DECODER_DIMS, LM),
    "olmoe": (_DECODER_DIMS | _MOE, LM),
    "granite": (_DECODER_DIMS, LM),
    "starcoder2": (_DECODER_DIMS, LM),
    "stablelm": (_DECODER_DIMS, LM),
    "cohere": (_DECODER_DIMS, LM),
    "helium": (_HEAD8, LM),
    "smollm3": (_DECODER_DIMS, LM),
    "gpt_neox": (_DECODER_DIMS, LM),
    "falcon": (dict(_DECODER_DIMS, num_kv_heads=2, new_decoder_architecture=True), LM),
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0), LM),
    "opt": (dict(_DECODER_DIMS, ffn_dim=37, word_embed_proj_dim=32), LM),
    "xglm": (dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=37, vocab_size=99, max_position_embeddings=64,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2), LM),
    "biogpt": (dict(_DECODER_DIMS, pad_token_id=1, bos_token_id=0, eos_token_id=2), LM),
    "gpt_neo": (dict(hidden_size=32, num_layers=2, num_heads=4, vocab_size=99, max_position_embeddings=64,
                     attention_types=[[["global", "local"], 1]], window_size=8, bos_token_id=1, eos_token_id=2), LM),
    # encoder-decoders
    "t5": (_T5_DIMS, S2S),
    "mt5": (_T5_DIMS, S2S),
    "umt5": (_T5_DIMS, S2S),
    "longt5": (dict(_T5_DIMS, local_radius=4), S2S),
    "bart": (_SEQ2SEQ_DIMS, S2S),
    "mbart": (_SEQ2SEQ_DIMS, S2S),
    "pegasus": (dict(_SEQ2SEQ_DIMS, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0), S2S),
    "marian": (dict(_SEQ2SEQ_DIMS, pad_token_id=0, decoder_start_token_id=0, decoder_vocab_size=99), S2S),
    "blenderbot": (_SEQ2SEQ_DIMS, S2S),
    "blenderbot-small": (_SEQ2SEQ_DIMS, S2S),
    "plbart": (_SEQ2SEQ_DIMS, S2S),
    "m2m_100": (_SEQ2SEQ_DIMS, S2S),
    "fsmt": (dict(langs=["en", "de"], src_vocab_size=99, tgt_vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
                  max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=2, forced_eos_token_id=None), S2S),
    # vision encoders
    "vit": (_VIT_DIMS, BARE),
    "deit": (_VIT_DIMS, BARE),
    "vit_msn": (_VIT_DIMS, BARE),
    "beit": (dict(_VIT_DIMS, use_mask_token=False), BARE),
    "data2vec-vision": (dict(_VIT_DIMS, use_mask_token=False), BARE),
    "dinov2": (dict(_VIT_DIMS, mlp_ratio=2), BARE),
    "vit_mae": (dict(_VIT_DIMS, mask_ratio=0.0), BARE),
    "clip_vision_model": (_VIT_DIMS, BARE),
    "siglip_vision_model": (_VIT_DIMS, BARE),
}
ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "mpnet", "vit"]
DECODERS = ["gpt2", "llama", "mistral", "qwen2"]
ENCODER_DECODERS = ["t5", "bart"]
VISION = {"vit", "deit", "vit_msn", "beit", "data2vec-vision", "dinov2", "vit_mae", "clip_vision_model", "siglip_vision_model"}
FAMILY: dict[str, str] = {
    t: "vision" if t in VISION else "decoder" if auto is LM else "encoder-decoder" if auto is S2S else "encoder"
    for t, (_, auto) in TINY.items()
}


def _interleaved(blocks: int, order: str, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Output rows of each of q, k, v in a fused projection of ``blocks`` blocks, each laid out as
    ``order`` with ``sizes`` rows per letter (written out here, apart from ``sites.Part``)."""
    width = blocks * sum(sizes[c] for c in order)
    rows, start = {}, 0
    for c in order:
        rows[f"attn_{c}"] = torch.cat([torch.arange(b * width // blocks + start, b * width // blocks + start + sizes[c])
                                       for b in range(blocks)])
        start += sizes[c]
    return rows


# model_type -> role -> the output rows of its fused projection the role owns, read off each model's
# attention code (heads 4, key/value heads 2 where grouped, head dim 8, FFN 37, as the configs above)
FUSED_ROWS: dict[str, dict[str, torch.Tensor]] = {
    "gpt2": _interleaved(1, "qkv", dict(q=32, k=32, v=32)),  # c_attn: [q; k; v]
    "modernbert": {**_interleaved(1, "qkv", dict(q=32, k=32, v=32)),  # Wi: [act(input); gate], its own names
                   "ffn_gate": torch.arange(0, 37), "ffn_up": torch.arange(37, 74)},
    "gpt_bigcode": _interleaved(1, "qkv", dict(q=32, k=8, v=8)),  # multi-query: one key and value head
    "phi3": {**_interleaved(1, "qkv", dict(q=32, k=16, v=16)),  # grouped-query widths
             "ffn_gate": torch.arange(0, 37), "ffn_up": torch.arange(37, 74)},  # gate_up_proj: [gate; up]
    "bloom": _interleaved(4, "qkv", dict(q=8, k=8, v=8)),  # (heads, 3, head_dim)
    "gpt_neox": _interleaved(4, "qkv", dict(q=8, k=8, v=8)),
    "deberta": _interleaved(4, "qkv", dict(q=8, k=8, v=8)),  # in_proj, then q_bias / v_bias added
    "falcon": _interleaved(2, "qkv", dict(q=16, k=8, v=8)),  # per key/value head: its 2 queries, key, value
    "codegen": _interleaved(4, "qvk", dict(q=8, k=8, v=8)),  # 4 model-parallel blocks of [q; v; k]
}


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    kwargs, auto = TINY[model_type]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = auto.from_config(config).to(dtype).eval()
    return model


def tiny_inputs(model_type: str, batch: int = 4, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """A padded batch: rows of different lengths with an attention mask (right padding)."""
    g = torch.Generator().manual_seed(seed)
    if model_type in VISION:
        inputs = {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
        if model_type == "vit_mae":  # fixed patch shuffling, so that two calls see the same patches
            inputs["noise"] = torch.rand(batch, 16, generator=g)
        return inputs
    ids = torch.randint(3, 99, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    pad = TINY[model_type][0].get("pad_token_id", 0)
    for i in range(batch):
        n = seq - (i % 3) * 2  # lengths seq, seq-2, seq-4, ...
        mask[i, n:] = 0
        ids[i, n:] = pad
    inputs = {"input_ids": ids, "attention_mask": mask}
    if FAMILY.get(model_type) == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.randint(3, 99, (batch, 5), generator=g)
    if model_type == "fsmt":
        inputs["use_cache"] = False  # 4.57's FSMT fails to build its cache
    return inputs


def train_steps(model, batch: dict, adapter_names, steps: int = 8, lr: float = 0.05, after_backward=None):
    """``steps`` AdamW steps of the trainable parameters on one batch (the model in train mode).
    Returns the losses and the parameters as they were before, by name; ``after_backward(step)``
    runs between each backward and its optimizer step (to look at the gradients)."""
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = model(**batch, adapter_names=adapter_names).loss
        optimizer.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward(step)
        optimizer.step()
        losses.append(loss.item())
    return losses, before


def package_dir(module: str) -> pathlib.Path:
    return pathlib.Path(next(iter(importlib.util.find_spec(module).submodule_search_locations)))


# -- tiny generative models with a word-level tokenizer (prompt/response tasks) ---------------------

WORD_SPECIALS = ["<pad>", "<unk>", "<eos>", "<bos>"]  # ids 0..3
# the special ids of every tiny seq2seq LM below; the decoder starts from pad (T5's way) or EOS (BART's)
_S2S_SPECIAL_IDS = dict(pad_token_id=0, eos_token_id=2, bos_token_id=3)
_S2S_START = {"t5": 0, "bart": 2}
# init scales at which a 32-wide model's logits can be confident (at BART's default 0.02 its loss floors
# near ln(vocab)), and no dropout: a few hundred steps then memorise a handful of answers
_S2S_INIT = {"t5": dict(initializer_factor=1.0, dropout_rate=0.0), "bart": dict(init_std=0.3, dropout=0.0)}


def word_tokenizer(words: list[str]):
    """A fast word-level tokenizer: ``WORD_SPECIALS`` then ``words`` (sorted, deduplicated); it splits on
    white space and, as T5's does, ends every text with ``<eos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = WORD_SPECIALS + sorted(set(words) - set(WORD_SPECIALS))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>", bos_token="<bos>")


def tiny_seq2seq_lm(model_type: str, vocab_size: int, seed: int = 0):
    """A tiny random T5 or BART (``TINY``'s dims) for ``word_tokenizer``'s ids, with its LM head."""
    kwargs = dict(TINY[model_type][0], vocab_size=vocab_size, decoder_start_token_id=_S2S_START[model_type],
                  **_S2S_SPECIAL_IDS, **_S2S_INIT[model_type])
    torch.manual_seed(seed)
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()
