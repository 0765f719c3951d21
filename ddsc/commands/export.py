"""Export a training checkpoint (Composer .pt / sharded folder, DeepSpeed ZeRO) to a Hugging Face folder.

The folder loads with ``DDSCModel.from_pretrained(dir)`` and, without ddsc installed, with
``transformers.AutoModel.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="Composer .pt, Composer sharded folder or DeepSpeed folder")
    parser.add_argument("--out", required=True, help="output folder (replaced when complete)")
    parser.add_argument("--config", help="run config.yaml (default: the one in the checkpoint's save folder)")
    parser.add_argument("--vocab", help="gene vocab.json (default: beside the training data)")
    parser.add_argument("--labels", help="labels.json (default: data.labels or beside the training data)")


def run(args: argparse.Namespace) -> int:
    from ddsc.train.export import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, args.config, args.vocab, args.labels)
    print(summary.format())
    return 0
