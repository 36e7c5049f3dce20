"""Generation speed on the device with and without the side network's hooks (issue 13), without training: the
side network's cost per token does not depend on its weights.

    python benchmarks/generation_speed.py --out benchmarks/results/generation_speed.json

SmolLM2-135M-Instruct in bf16, BBC test prompts cut to their last 256 tokens (as ``benchmarks/generative.py``'s
speed test), greedy, exactly 32 new tokens, at batch 1 (8 prompts) and batch 8 (32 prompts); the headline recipe's
side network (30 taps, reduction 8). Plain and hooked runs alternate, ``--repeats`` times each, after one untimed
batch; the JSON keeps every run and reports the overhead from each setting's best run (the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results/generation_speed.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", default="1:8,8:32", help="batch size:prompts, comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from generative import fixed_prompts, prompt_batches, timed

    from lightning_mobillm.backbone import FrozenBackbone
    from lightning_mobillm.data import InstructionDataModule
    from lightning_mobillm.generation import generate_texts
    from lightning_mobillm.side.causal_lm import ResidualLMHead
    from lightning_mobillm.side.parallel_adapters import ParallelAdapterTrunk
    from lightning_mobillm.specs import BackboneConfig

    backbone = FrozenBackbone(BackboneConfig(source="smollm2-135m", dtype="bfloat16"))
    data = InstructionDataModule(dataset="bbc_headlines", max_length=256)
    data.set_tokenizer(backbone.tokenizer)
    runs = [tuple(int(x) for x in r.split(":")) for r in args.runs.split(",")]
    prompts = fixed_prompts(data, max(n for _, n in runs), args.prompt_tokens)
    torch.manual_seed(0)
    trunk = ParallelAdapterTrunk(len(backbone.layers), backbone.hidden_size, reduction=8).eval()
    side = SimpleNamespace(trunk=trunk, head=ResidualLMHead(trunk.out_features, backbone.hidden_size).eval())
    results: dict[str, Any] = {}
    for batch_size, count in runs:
        batches = prompt_batches(prompts, batch_size, count)
        tps: dict[str, list[float]] = {"without_side": [], "with_side": []}
        for _ in range(args.repeats):
            for name, s in (("without_side", None), ("with_side", side)):
                kw = {"side": s, "layers": backbone.layers, "max_new_tokens": args.new_tokens,
                      "min_new_tokens": args.new_tokens}
                _, seconds = timed(lambda b, kw=kw: generate_texts(backbone.model, backbone.tokenizer, b, **kw),
                                   batches)
                tps[name].append(count * args.new_tokens / seconds)
        results[f"batch_{batch_size}"] = {"prompts": count, "tokens_per_s": tps,
                                          "side_overhead": max(tps["without_side"]) / max(tps["with_side"]) - 1}
        print(batch_size, json.dumps(results[f"batch_{batch_size}"]), flush=True)
    out = {"command": " ".join(["python", *sys.argv]), "prompt_tokens": args.prompt_tokens,
           "new_tokens": args.new_tokens, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
