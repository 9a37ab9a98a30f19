"""Minimal mirror of llama.cpp's convert_hf_to_gguf.py for HF Llama/Mistral
checkpoints with a SentencePiece tokenizer.model, written without torch.

Mirrored from llama.cpp (vendor/llama.cpp of llama-cpp-python 0.3.36):
  conversion/llama.py  LlamaModel.set_vocab / set_gguf_parameters / permute / modify_tensors
  conversion/base.py   TextModel.set_gguf_parameters, _set_vocab_sentencepiece,
                       _create_vocab_sentencepiece, prepare_tensors (dtype rules)
and gguf.SpecialVocab (from the gguf package) for bos/eos/add_bos/chat_template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import gguf
from gguf import TokenType as SentencePieceTokenTypes  # same values as conversion/base.py SentencePieceTokenTypes


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """LlamaModel.permute (HF rotate-half layout -> GGUF interleaved-pair layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def does_token_look_special(token: str) -> bool:
    # TextModel.does_token_look_special
    seems_special = token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
    seems_special = seems_special or (token.startswith("<|") and token.endswith("|>"))
    seems_special = seems_special or (token.startswith("<｜") and token.endswith("｜>"))
    seems_special = seems_special or (token.startswith("<unused") and token.endswith(">"))
    return seems_special


def create_vocab_sentencepiece(dir_model: Path, vocab_size: int | None):
    """TextModel._create_vocab_sentencepiece."""
    from sentencepiece import SentencePieceProcessor

    tokenizer_path = dir_model / "tokenizer.model"
    tokenizer = SentencePieceProcessor()
    tokenizer.LoadFromFile(str(tokenizer_path))
    vocab_size = vocab_size or tokenizer.vocab_size()

    tokens = [f"[PAD{i}]".encode("utf-8") for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [SentencePieceTokenTypes.UNUSED] * vocab_size

    for token_id in range(tokenizer.vocab_size()):
        if token_id >= vocab_size:
            break
        piece = tokenizer.IdToPiece(token_id)
        text = piece.encode("utf-8")
        score = tokenizer.GetScore(token_id)
        toktype = SentencePieceTokenTypes.NORMAL
        if tokenizer.IsUnknown(token_id):
            toktype = SentencePieceTokenTypes.UNKNOWN
        elif tokenizer.IsControl(token_id):
            toktype = SentencePieceTokenTypes.CONTROL
        elif tokenizer.IsUnused(token_id):
            toktype = SentencePieceTokenTypes.UNUSED
        elif tokenizer.IsByte(token_id):
            toktype = SentencePieceTokenTypes.BYTE
        tokens[token_id] = text
        scores[token_id] = score
        toktypes[token_id] = toktype

    added_tokens_file = dir_model / "added_tokens.json"
    if added_tokens_file.is_file():
        for key, token_id in json.loads(added_tokens_file.read_text(encoding="utf-8")).items():
            if token_id >= vocab_size:
                continue
            tokens[token_id] = key.encode("utf-8")
            scores[token_id] = -1000.0
            toktypes[token_id] = SentencePieceTokenTypes.USER_DEFINED

    tokenizer_config_file = dir_model / "tokenizer_config.json"
    if tokenizer_config_file.is_file():
        tokenizer_config_json = json.loads(tokenizer_config_file.read_text(encoding="utf-8"))
        for token_id, token_data in tokenizer_config_json.get("added_tokens_decoder", {}).items():
            token_id = int(token_id)
            token: str = token_data["content"]
            if token_id >= vocab_size:
                continue
            if token_data.get("special") or does_token_look_special(token):
                toktypes[token_id] = SentencePieceTokenTypes.CONTROL
            else:
                token = token.replace("\u2581", " ")
                toktypes[token_id] = SentencePieceTokenTypes.USER_DEFINED
            scores[token_id] = -1000.0
            tokens[token_id] = token.encode("utf-8")

    if vocab_size > len(tokens):
        pad_count = vocab_size - len(tokens)
        for i in range(1, pad_count + 1):
            tokens.append(bytes(f"[PAD{i}]", encoding="utf-8"))
            scores.append(-1000.0)
            toktypes.append(SentencePieceTokenTypes.UNUSED)

    return tokens, scores, toktypes


def set_vocab(gw: gguf.GGUFWriter, dir_model: Path, vocab_size: int | None) -> dict:
    """LlamaModel.set_vocab for a dir with tokenizer.model (SentencePiece path)."""
    tc_file = dir_model / "tokenizer_config.json"
    if tc_file.is_file():
        tc = json.loads(tc_file.read_text(encoding="utf-8"))
        if (add_prefix_space := tc.get("add_prefix_space")) is not None:
            gw.add_add_space_prefix(add_prefix_space)
    tokens, scores, toktypes = create_vocab_sentencepiece(dir_model, vocab_size)
    gw.add_tokenizer_model("llama")
    gw.add_tokenizer_pre("default")
    gw.add_token_list(tokens)
    gw.add_token_scores(scores)
    gw.add_token_types(toktypes)
    special_vocab = gguf.SpecialVocab(dir_model, n_vocab=len(tokens))
    special_vocab.add_to_gguf(gw, quiet=True)
    return {
        "special_token_ids": dict(special_vocab.special_token_ids),
        "add_special_token": dict(special_vocab.add_special_token),
        "n_tokens": len(tokens),
    }


def set_gguf_parameters(gw: gguf.GGUFWriter, hp: dict, ftype: gguf.LlamaFileType) -> None:
    """TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters (subset used by Mistral configs)."""
    gw.add_block_count(hp["num_hidden_layers"])
    gw.add_context_length(hp["max_position_embeddings"])
    gw.add_embedding_length(hp["hidden_size"])
    gw.add_feed_forward_length(hp["intermediate_size"])
    gw.add_head_count(hp["num_attention_heads"])
    gw.add_head_count_kv(hp["num_key_value_heads"])
    gw.add_rope_freq_base(hp["rope_theta"])
    gw.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        gw.add_key_length(hp["head_dim"])
        gw.add_value_length(hp["head_dim"])
    gw.add_file_type(ftype)
    gw.add_vocab_size(hp["vocab_size"])
    rope_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    gw.add_rope_dimension_count(rope_dim)


# HF name -> GGUF name for the Llama/Mistral tensors (gguf.get_tensor_name_map(LLAMA))
def gguf_tensor_name(hf_name: str, n_layers: int) -> str:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ValueError(f"cannot map {hf_name}")
    return new


def convert_tensors(gw: gguf.GGUFWriter, tensors: dict[str, np.ndarray], hp: dict) -> list[dict]:
    """modify_tensors (Q/K permute) + prepare_tensors dtype rules for --outtype f16."""
    n_head = hp["num_attention_heads"]
    n_kv_head = hp["num_key_value_heads"]
    log = []
    for name, data in tensors.items():
        data = np.asarray(data)
        if data.dtype not in (np.float16, np.float32):
            data = data.astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = permute(data, n_head, n_head)
        if name.endswith("k_proj.weight"):
            data = permute(data, n_head, n_kv_head)
        new_name = gguf_tensor_name(name, hp["num_hidden_layers"])
        n_dims = len(data.shape)
        if n_dims <= 1 or new_name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F32
        else:
            qtype = gguf.GGMLQuantizationType.F16
        out = gguf.quants.quantize(data, qtype)
        gw.add_tensor(new_name, out, raw_dtype=qtype)
        log.append({"hf_name": name, "gguf_name": new_name, "type": qtype.name, "ne": list(reversed(out.shape))})
    return log


def write_vocab_only_gguf(out_path: Path, dir_model: Path, hp: dict, extra=None) -> dict:
    gw = gguf.GGUFWriter(str(out_path), arch="llama")
    set_gguf_parameters(gw, hp, gguf.LlamaFileType.MOSTLY_F16)
    info = set_vocab(gw, dir_model, hp.get("vocab_size"))
    if extra:
        extra(gw)
    gw.write_header_to_file()
    gw.write_kv_data_to_file()
    gw.write_tensors_to_file()
    gw.close()
    return info
