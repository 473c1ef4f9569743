"""Ask a released model about images; the answer streams token by token.

    python scripts/chat.py RELEASE --image digit.png --question "what digit is this ?"
    python scripts/chat.py RELEASE --image a.png --image b.png --question "..."   # one answer per image
    python scripts/chat.py RELEASE --image digit.png                              # questions from stdin, one per line

Decoding is greedy (the release's generation_config.json sets the token budget). The release
folder, every image (decoded by PIL, header only) and the flags are checked before the model
is loaded; a mistake is one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Streamer:
    """Prints each row's text as it grows (decoding the whole row each time: safe for BPE merges)."""

    def __init__(self, tokenizer, rows: int, live_row: int | None):
        self.tokenizer, self.live_row = tokenizer, live_row
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.shown = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids[row].append(token)
        if row == self.live_row:
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True).strip()
            print(text[len(self.shown) :] if text.startswith(self.shown) else "\n" + text, end="", flush=True)
            self.shown = text


def check_release(folder: Path) -> str | None:
    """Why ``folder`` is not a release folder, or None."""
    if not folder.is_dir():
        return f"no such release folder {folder}"
    missing = [f for f in ("config.json", "generation_config.json") if not (folder / f).is_file()]
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        missing.append("model.safetensors")  # or, for a large model, its shards' index
    if missing:
        return f"{folder} is not a release folder (no {', '.join(missing)}): give a folder export_release.py wrote"
    return None


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line (one line), or None; opens no model file."""
    from PIL import Image, UnidentifiedImageError  # here, not at the top: --help stays fast

    problem = check_release(args.release)
    if problem:
        return problem
    if args.question is not None and not args.question.strip():
        return "--question is empty: give a question, or leave --question out to read questions from stdin"
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= 100_000:
        return f"--max-new-tokens {args.max_new_tokens}: give a number of tokens from 1 to 100000"
    for p in args.image:
        if not Path(p).is_file():
            return f"no such image {p}"
        try:
            with Image.open(p) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            return f"{p} is not an image PIL can read ({type(e).__name__}): give a PNG, JPEG, WebP, ... file"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("release", type=Path)
    ap.add_argument("--image", action="append", required=True, help="image file (repeat for several)")
    ap.add_argument("--question", default=None, help="default: read questions from stdin")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    args = ap.parse_args()
    problem = check_args(args)
    if problem:
        sys.exit(f"chat: {problem}")

    # here, not at the top: --help and argument errors come before the heavy imports
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, GenerationConfig

    import mm  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(str(args.release), local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(str(args.release), local_files_only=True)
    gen = GenerationConfig.from_pretrained(str(args.release))
    max_new = args.max_new_tokens or gen.max_new_tokens
    images = processor.und_images([Image.open(p) for p in args.image])
    questions = [args.question] if args.question is not None else (ln.strip() for ln in sys.stdin if ln.strip())
    asked = 0
    for q in questions:
        asked += 1
        one = len(args.image) == 1
        streamer = Streamer(processor.tokenizer, len(args.image), 0 if one else None)
        if one:
            print("> ", end="", flush=True)
        answers = model.answer(images, [q] * len(images), max_new_tokens=max_new, on_token=streamer)
        if one:
            print(flush=True)
        else:
            for path, a in zip(args.image, answers):
                print(f"{path}: {a}", flush=True)
    if not asked:
        sys.exit("chat: no question on stdin: pass --question TEXT, or pipe questions one per line")


if __name__ == "__main__":
    main()
