"""Train a unified model. ``python train.py`` trains configs/tiny.yaml on the bundled digits.

python train.py [--config configs/X.yaml] [key=value ...] [--resume auto|latest|DIR] [--overwrite]
torchrun --nproc_per_node=8 --nnodes=N ... train.py ...        (DDP or DeepSpeed: engine.kind=...)
deepspeed --num_gpus=8 train.py --config ... engine.kind=deepspeed
sbatch scripts/launch_slurm.sh --config ...                      (multi-node, see the README)
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights and tokenizers come from local paths only

from mm.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file overriding the typed defaults")
    ap.add_argument(
        "--resume",
        default=None,
        help="'auto' (the newest checkpoint of this run if any, else start fresh: safe for requeues), "
        "'latest' (must exist) or a checkpoint directory",
    )
    ap.add_argument("--overwrite", action="store_true", help="start over even if the run directory has checkpoints")
    # the deepspeed launcher passes --local_rank; the rank comes from the environment
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=100 run.dir=/tmp/run")
    args = ap.parse_intermixed_args()  # overrides may come after options: --resume auto train.max_steps=5
    try:
        if args.resume is not None and not args.resume.strip():
            raise ConfigError("--resume is empty: give auto, latest or a checkpoint directory")
        cfg = load_config(args.config, args.overrides)
        # here, not at the top: --help stays fast
        from mm.checkpoint import CheckpointError
        from mm.train.launch import main as launch

        try:
            launch(cfg, args.resume, args.overwrite)
        except (CheckpointError, FileNotFoundError) as e:  # a checkpoint (or a model path) missing, damaged, unfit
            sys.exit(str(e))
    except ConfigError as e:  # a config mistake (or a run dir, shard pattern) is one line naming the key
        sys.exit(str(e))


if __name__ == "__main__":
    main()
