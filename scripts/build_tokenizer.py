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
from mm.sequence import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, build_word_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def build_cased_word_tokenizer(texts: list[str], out_dir: Path) -> int:
    """A word-level tokenizer over ``texts`` with our special tokens, case kept; saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )  # fmt: skip
    fast.save_pretrained(str(out_dir))
    return len(fast)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", default="digits", choices=["digits", "generalist"])
    args = ap.parse_args()
    out = ROOT / "configs" / "tokenizers" / args.name
    if args.name == "digits":
        n = len(build_word_tokenizer(all_texts(), out))
    else:
        n = build_cased_word_tokenizer(generalist_texts(), out)
    print(f"wrote {out} ({n} tokens)")
