"""Rebuild tiersim/data/public-prefill-profiles.json from the public sources it cites.

Usage: python scripts/extract_public_prefill.py VIDUR_DIR SPLITWISE_CSV [OUT]
VIDUR_DIR holds data/profiling/compute/<gpu>/<org>/<model>/mlp.csv as in github.com/microsoft/vidur @ 7d47513;
SPLITWISE_CSV is data/perf_model.csv of github.com/Mutinifni/splitwise-sim @ 8f99e7d. The kernel figures
(FlashAttention-3 on H100) and this project's own H100 GEMM run are read from where the file says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

GEMMS = ["attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"]
SMALL = ["input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add"]
TOKENS = [128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
#: Models whose tensor-parallel rows (the shard's GEMMs at TP 2/4/8) are kept too, as a check of the shard.
TP_MODELS = {"Llama-2-70b-hf", "CodeLlama-34b-Instruct-hf"}
VIDUR_LAYERS = {"Llama-2-7b-hf": 32, "Meta-Llama-3-8B": 32, "CodeLlama-34b-Instruct-hf": 48, "Llama-2-70b-hf": 80,
                "Meta-Llama-3-70B": 80, "internlm-20b": 60, "Qwen-72B": 80, "phi-2": 32}


def vidur_cases(root: Path) -> list[dict]:
    cases = []
    for gpu in ("a100", "h100"):
        for path in sorted((root / "data/profiling/compute" / gpu).glob("*/*/mlp.csv")):
            full = pd.read_csv(path)
            for tp in sorted(full.num_tensor_parallel_workers.unique()):
                if tp > 1 and path.parent.name not in TP_MODELS:
                    continue
                cases.append(_vidur_case(gpu, path, full[full.num_tensor_parallel_workers == tp], int(tp)))
    return cases


def _vidur_case(gpu: str, path: Path, df: pd.DataFrame, tp: int) -> dict:
    """Per-layer GEMM and small-op sums (medians, ms) at the stored token counts for one model and TP degree."""
    med = df.groupby("num_tokens").median(numeric_only=True)
    r0 = df.iloc[0]
    ops = []
    for n in TOKENS:
        if n not in med.index:
            continue
        row = med.loc[n]
        ops.append({"tokens": n, "gemm_ms": round(float(sum(row[f"time_stats.{o}.median"] for o in GEMMS)), 4),
                    "small_ms": round(float(sum(row.get(f"time_stats.{o}.median", 0.0) for o in SMALL)), 4)})
    model = path.parent.name
    return {"gpu": gpu, "model": model, "hf_id": f"{path.parent.parent.name}/{model}", "tp": tp,
            "num_layers": VIDUR_LAYERS[model], "hidden_size": int(r0.n_embd),
            "num_attention_heads": int(r0.n_head), "num_kv_heads": int(r0.n_kv_head),
            "intermediate_size": int(r0.n_expanded_embd), "gated_mlp": bool(r0.use_gated_mlp),
            "vocab_size": int(r0.vocab_size), "ops": ops}


def splitwise_cases(csv: Path) -> list[dict]:
    df = pd.read_csv(csv)
    df = df[(df.batch_size == 1) & (df.hardware.isin(["a100-80gb", "h100-80gb"]))]
    med = df.groupby(["model", "hardware", "tensor_parallel", "prompt_size"]).prompt_time.median()
    out = []
    for (model, hw, tp), sub in med.groupby(level=[0, 1, 2]):
        out.append({"gpu": hw.split("-")[0], "model": model, "tp": int(tp),
                    "points": [{"prompt": int(k[3]), "ttft_ms": round(float(v), 2)} for k, v in sub.items()]})
    return out


def main(argv: list[str]) -> None:
    vidur, split = Path(argv[1]), Path(argv[2])
    out = Path(argv[3]) if len(argv) > 3 else Path("tiersim/data/public-prefill-profiles.json")
    data = json.loads(out.read_text()) if out.exists() else {}
    data["gemm_cases"] = vidur_cases(vidur)
    data["ttft_cases"] = splitwise_cases(split)
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv)
