#!/usr/bin/env python3
"""Tokenizer fixtures for the real GGUF models, produced by llama.cpp.

Input : tests/fixtures/tokenize/corpus.json (hand-written strings)
Output: tests/fixtures/tokenize/<key>.json for key in common.MODELS

For every corpus string: ids = llama.tokenize(text, add_bos=False, special=False)
and detok = llama_detokenize(ids, remove_special=False, unparse_special=False)
decoded as UTF-8 with errors="replace" (the C function, not Llama.detokenize,
which truncates pieces longer than 32 bytes).
"special_cases" use special=True on texts containing the model's real
special tokens (control tokens are only matched when special=True).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FIXTURES,
    MODELS,
    detokenize,
    generator_info,
    load_llama,
    model_path,
    read_json,
    tokenize,
    write_json,
)

CHATML_SPECIAL = [
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nBonjour, ça va ? 😀<|im_end|>\n<|im_start|>assistant\nOui !<|im_end|>\n<|im_start|>user\n  spaced  <|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    "<|im_end|><|im_start|><|im_end|>",
    " <|im_start|> spaces around <|im_end|> ",
    "<|im_start|>user\n<|endoftext|> is not special here? <|im_end|>\n",
    "<|im_start",
    "<|im_start|>assistant\n```python\nprint(1)\n```<|im_end|>\n",
]

EXTRA_SPECIAL = {
    "smollm2": [
        "<repo_name>brise<file_sep>src/main.rs\nfn main() {}\n<|endoftext|>",
        "<jupyter_start><jupyter_code>x = 1<jupyter_output>1<empty_output>",
    ],
    "qwen2.5-coder": [
        "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n    return c<|fim_middle|>",
        "<|repo_name|>brise\n<|file_sep|>src/lib.rs\npub fn f() {}\n",
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    ],
}


def tok_case(llm, text: str, special: bool) -> dict:
    ids = tokenize(llm, text, add_special=False, parse_special=special)
    case = {"text": text, "ids": ids, "detok": detokenize(llm, ids).decode("utf-8", "replace")}
    if special:
        case["detok_special"] = detokenize(llm, ids, unparse_special=True).decode("utf-8", "replace")
    return case


def main() -> None:
    corpus = read_json(FIXTURES / "tokenize" / "corpus.json")["texts"]
    for key in MODELS:
        path, sha = model_path(key)
        llm = load_llama(path, vocab_only=True)
        cases = [tok_case(llm, t, special=False) for t in corpus]
        specials = [tok_case(llm, t, special=True) for t in CHATML_SPECIAL + EXTRA_SPECIAL[key]]
        # determinism check: a second pass must agree exactly
        for c in cases:
            assert tokenize(llm, c["text"], False, False) == c["ids"]
        out = {
            "generator": generator_info(
                __file__,
                call="llama_tokenize(vocab, text_utf8, add_special=False, parse_special=False|True) "
                "== Llama(model_path, vocab_only=True).tokenize(text, add_bos=False, special=...)",
                detok_call="llama_detokenize(vocab, ids, remove_special=False, unparse_special=False).decode('utf-8', 'replace'); "
                "detok_special (special_cases only): same with unparse_special=True",
            ),
            "model_file": path.name,
            "sha256": sha,
            "cases": cases,
            "special_cases": specials,
        }
        write_json(FIXTURES / "tokenize" / f"{key}.json", out)
        del llm


if __name__ == "__main__":
    main()
