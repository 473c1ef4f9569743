"""Train the frequency-band tokenizer from a config (the logic: ``mm/train/tokenizer.py``).

python scripts/train_tokenizer.py --config configs/tokenizer/tiny.yaml [train.steps=500 out_dir=/tmp/tok]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mm.train.tokenizer import main  # noqa: E402

if __name__ == "__main__":
    main()
