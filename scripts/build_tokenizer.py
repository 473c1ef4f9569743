"""Rebuild the tiny word-level tokenizer shipped in configs/tokenizers/digits."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.bundled.digits import all_texts  # noqa: E402
from mm.sequence import build_word_tokenizer  # noqa: E402

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "configs" / "tokenizers" / "digits"
    vocab = build_word_tokenizer(all_texts(), out)
    print(f"wrote {out} ({len(vocab)} tokens)")
