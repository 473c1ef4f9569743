"""Train a unified model. ``python train.py`` trains configs/tiny.yaml on the bundled digits.

python train.py [--config configs/X.yaml] [key=value ...] [--resume latest|DIR] [--overwrite]
torchrun --nproc_per_node=2 train.py ...
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and tokenizers come from local paths only

from mm.config import DEFAULT_CONFIG, load_config  # noqa: E402
from mm.train.trainer import main_cli  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file overriding the typed defaults")
    ap.add_argument("--resume", default=None, help="'latest' (of this run's directory) or a checkpoint directory")
    ap.add_argument("--overwrite", action="store_true", help="start over even if the run directory has checkpoints")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=100 run.dir=/tmp/run")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    main_cli(cfg, args.resume, args.overwrite)


if __name__ == "__main__":
    main()
