"""Rebuild the tiny word-level tokenizers shipped in configs/tokenizers/.

    python scripts/build_tokenizer.py              # digits: the default's words, lower-cased
    python scripts/build_tokenizer.py generalist   # the generalist recipe's: every benchmark prompt, cased

``digits`` (``configs/tokenizers/digits``) knows the default's questions and prompts only. ``generalist``
(``configs/tokenizers/generalist``) knows every word of the bundled benchmark's prompts and of the
generalist recipe's data (``data.bundled.generalist.generalist_texts``) and keeps case, so the option
letters "A".."D" it answers with are not the article "a", and VLMEvalKit's letter matcher reads them.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.bundled.digits import all_texts  # noqa: E402
from data.bundled.generalist import generalist_texts  # noqa: E402
from mm.sequence import build_word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", default="digits", choices=["digits", "generalist"])
    args = ap.parse_args()
    out = ROOT / "configs" / "tokenizers" / args.name
    if args.name == "digits":
        n = len(build_word_tokenizer(all_texts(), out))
    else:
        n = len(build_word_tokenizer(generalist_texts(), out, lowercase=False))
    print(f"wrote {out} ({n} tokens)")
