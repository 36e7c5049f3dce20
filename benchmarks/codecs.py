"""Wire size, error and speed of every activation codec on real SmolLM2-135M hidden states.

Runs the frozen backbone (fp32) on real BBC News training batches of 8 x 128 tokens, with both token
selections (``all``: every non-pad token, ``loss``: one token a sample), packs all tapped layers
``acts [N, L, d]`` into a ``train`` frame exactly as the device does, and reports for every codec:

- ``frame_bytes_per_sample``: length of the encoded frame (header, safetensors body with every part,
  lengths and labels) divided by the batch size;
- ``raw_bytes_per_sample``: ``N * L * d * bytes_per_value(codec)`` / batch size, the activation values
  alone at the plain codec's rate (1 byte for int8o, 0.5 for int4o: their fp16 outliers count as overhead);
- ``overhead_pct``: ``(frame - raw) / raw`` in %;
- ``rel_error``: ``||dec - x|| / ||x||`` over all batches together (sums of squares);
- ``rms_token_rel_error``: mean over every token and tapped layer of
  ``||rmsnorm(dec) - rmsnorm(x)|| / ||rmsnorm(x)||`` -- the side network RMS-normalises each tap;
- ``encode_ms`` (``protocol.pack_acts``), ``frame_ms`` (``encode_frame`` + ``decode_frame`` with the
  server's schema checks) and ``decode_ms`` (``protocol.unpack_acts``), mean per batch. Indicative
  only: the machine may be shared.

    python benchmarks/codecs.py --batches 4 --out benchmarks/results/codecs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from lightning_mobillm import protocol
from lightning_mobillm.side import rms_normalize
from lightning_mobillm.transport import codecs
from lightning_mobillm.transport.frames import Frame, decode_frame, encode_frame

SELECTS = ("all", "loss")


def _batches(args) -> tuple[list[dict], dict]:
    """Run the backbone over ``args.batches`` training batches; return per-batch acts for both selections."""
    from lightning_mobillm.backbone import FrozenBackbone
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.specs import BackboneConfig

    t0 = time.perf_counter()
    bb = FrozenBackbone(BackboneConfig(source=args.model, dtype="float32"))
    dm = TextClassificationDataModule(dataset="bbc_news", max_length=args.max_length, batch_size=args.batch_size)
    dm.set_tokenizer(bb.tokenizer)
    dm.setup("fit")
    out = []
    with torch.inference_mode():
        for i, batch in enumerate(dm.train_dataloader()):
            if i >= args.batches:
                break
            item = {"labels": batch["labels"]}
            for select in SELECTS:
                o = bb(batch["input_ids"], batch["attention_mask"], select=select)
                item[select] = (o.acts.float().contiguous(), o.lengths)
            out.append(item)
    info = {"backbone": repr(bb), "forward_s": time.perf_counter() - t0}
    bb.close()
    return out, info


def _measure(batches: list[dict], select: str, codec: str, outlier_channels: int) -> dict:
    frame_bytes = raw_bytes = samples = 0
    err_sq = x_sq = tok_err_sum = 0.0
    tokens = 0
    enc_s = frame_s = dec_s = 0.0
    for item in batches:
        acts, lengths = item[select]
        labels = item["labels"]
        t0 = time.perf_counter()
        tensors = protocol.pack_acts(acts, lengths, codec, outlier_channels=outlier_channels)
        t1 = time.perf_counter()
        tensors["labels"] = labels
        header = {"session": "x" * 30, "step": 12345, "codec": codec}
        data = encode_frame(Frame(kind="train", header=header, tensors=tensors))
        frame = decode_frame(data, protocol.REQUEST_SCHEMAS)
        t2 = time.perf_counter()
        dec, _ = protocol.unpack_acts(frame.tensors, codec)
        t3 = time.perf_counter()
        enc_s, frame_s, dec_s = enc_s + (t1 - t0), frame_s + (t2 - t1), dec_s + (t3 - t2)

        frame_bytes += len(data)
        raw_bytes += acts.numel() * codecs.bytes_per_value(codec)
        samples += lengths.numel()
        diff = dec - acts
        err_sq += float(diff.double().pow(2).sum())
        x_sq += float(acts.double().pow(2).sum())
        nx, nd = rms_normalize(acts), rms_normalize(dec)
        per_vec = (nd - nx).norm(dim=-1) / nx.norm(dim=-1).clamp_min(1e-12)  # [N, L]
        tok_err_sum += float(per_vec.double().sum())
        tokens += per_vec.numel()
    n = len(batches)
    frame_ps, raw_ps = frame_bytes / samples, raw_bytes / samples
    return {
        "select": select,
        "codec": codec,
        "outlier_channels": outlier_channels if codec in ("int8o", "int4o") else None,
        "frame_bytes_per_sample": frame_ps,
        "raw_bytes_per_sample": raw_ps,
        "overhead_pct": 100.0 * (frame_ps - raw_ps) / raw_ps,
        "rel_error": (err_sq / x_sq) ** 0.5,
        "rms_token_rel_error": tok_err_sum / tokens,
        "encode_ms": 1000 * enc_s / n,
        "frame_ms": 1000 * frame_s / n,
        "decode_ms": 1000 * dec_s / n,
        "tokens_per_sample": sum(int(item[select][1].sum()) for item in batches) / samples,
    }


def _table(rows: list[dict]) -> str:
    head = ("| select | codec | frame B/sample | raw B/sample | overhead | rel err | RMS-norm token err "
            "| encode ms | frame ms | decode ms |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(
            f"| {r['select']} | {r['codec']} | {r['frame_bytes_per_sample']:,.0f} | {r['raw_bytes_per_sample']:,.0f} "
            f"| {r['overhead_pct']:.2f}% | {100 * r['rel_error']:.3f}% | {100 * r['rms_token_rel_error']:.3f}% "
            f"| {r['encode_ms']:.1f} | {r['frame_ms']:.1f} | {r['decode_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--outlier-channels", type=int, default=8)
    p.add_argument("--codecs", nargs="+", default=list(codecs.CODECS), choices=list(codecs.CODECS))
    p.add_argument("--out", default="benchmarks/results/codecs.json")
    args = p.parse_args()

    t0 = time.perf_counter()
    batches, info = _batches(args)
    print(f"{info['backbone']}: {len(batches)} batches forwarded in {info['forward_s']:.1f} s", flush=True)
    rows = []
    for select in SELECTS:
        for codec in args.codecs:
            rows.append(_measure(batches, select, codec, args.outlier_channels))
            r = rows[-1]
            print(f"  {select:4s} {codec:5s} rel err {100 * r['rel_error']:.3f}%", flush=True)
    acts = batches[0]["all"][0]
    out = {
        "model": args.model,
        "dtype": "float32",
        "dataset": "bbc_news (train split, first batches of the seeded shuffle)",
        "batches": len(batches),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "layers": acts.shape[1],
        "hidden_size": acts.shape[2],
        "outlier_channels": args.outlier_channels,
        "backbone": info["backbone"],
        "results": rows,
        "total_s": time.perf_counter() - t0,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "note": "timings indicative; the machine may run other jobs"},
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(_table(rows))
    print(f"\nwrote {path} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
