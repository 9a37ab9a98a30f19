#!/usr/bin/env python3
"""chrF reference values (tests/fixtures/chrf/chrf.json) from sacrebleu, the metric's
reference implementation: sentence-level `CHRF()` (character orders 1-6, no word
n-grams, beta 2, whitespace removed), which brise_train::behaviour::chrf reproduces.

  python3 scripts/ref/gen_chrf.py    # in the reference venv (sacrebleu 2.6.0)
"""

import json
from pathlib import Path

import sacrebleu
from sacrebleu.metrics import CHRF

PAIRS = [
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("Paris.", "The capital of France is Paris."),
    ("The capital of France is Paris.\n\n— Brise Support", "Rome is the capital of Italy.\n\n— Brise Support"),
    ('{"answer": "Blue whales.", "confidence": "high"}', '{"answer": "The blue whale.", "confidence": "high"}'),
    ("La capitale de l'Italie est Rome.", "The capital of Italy is Rome."),
    ("Les vaches mangent de l'herbe.", "Les vaches mangent surtout de l'herbe et du foin."),
    ("I'm sorry, but I can't help with cooking questions.", "I'm sorry, but I can't help with cooking questions."),
    ("Boil the pasta for ten minutes, then drain it.", "I'm sorry, but I can't help with cooking questions."),
    ("東京は日本の首都です。", "日本の首都は東京です。"),
    ("القاهرة هي عاصمة مصر", "عاصمة مصر هي القاهرة"),
    ("I love it 😀🎉", "I love 😀 it"),
    ("a", "a"),
    ("ab", "abc"),
    ("aaaa aaaa", "aa"),
    ("x", "y"),
    ("   spaced    out   ", "spacedout"),
    ("Hello world", ""),
    ("", "Hello world"),
    ("", ""),
]


def main():
    chrf = CHRF()
    cases = [{"hyp": h, "ref": r, "chrf": chrf.sentence_score(h, [r]).score} for h, r in PAIRS]
    out = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "chrf" / "chrf.json"
    out.write_text(json.dumps({"generator": f"sacrebleu {sacrebleu.__version__} CHRF() sentence_score",
                               "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
