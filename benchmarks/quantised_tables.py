"""Quantised Engram tables: per stored format, the bytes on disk, the row error against the
fp32 table, the validation loss of the model served from those files, and greedy decode tokens/s on the
disk tier, each relative to fp32 in the same run.

    python benchmarks/quantised_tables.py --ckpt runs/demo/seed0/demo-engram/train [--formats ...]
        [--batches 40] [--batch 4] [--prompt 32] [--new-tokens 48] [--rounds 7] [--json PATH]

The checkpoint's tables are exported once per format to a temporary directory; every model then serves
its rows from the disk tier (a memory map, warm page cache), so the loss is the loss of the files, not of
a simulation. Decode timing is paired: one model per format, timed round-robin in the same rounds, and
each format's ratio to fp32 is the median over rounds of its per-round ratio, so machine load moves both
sides. The size table also gives the bytes per row at the paper's d_h = 80 and DeepSeek-V4.1's 256 (from
the format's layout: ``RowFormat.row_bytes``), since a narrow row pays more for its scales.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from engram.infer import generate_batch
from engram.storage import FORMATS, apply_storage, export_tables
from engram.train import evaluate, load_checkpoint
from engram.train.startup import checkpoint_data

DEFAULT_FORMATS = ["float32", "bfloat16", "int8", "fp8_e4m3"]


def row_errors(model, fmt) -> dict:
    """Max and mean abs(x - decode(encode(x))) over every value of every Engram table."""
    worst, total, count = 0.0, 0.0, 0
    for layer in model.engram_layers.values():
        weight = layer.embedding.weight.detach()
        for start in range(0, weight.shape[0], 65536):
            x = weight[start: start + 65536].float()
            err = (x - fmt.decode(*fmt.encode(x))).abs()
            worst, total, count = max(worst, float(err.max())), total + float(err.sum()), count + err.numel()
    return {"max_abs_error": worst, "mean_abs_error": total / count,
            "mean_abs_value": float(sum(l.embedding.weight.detach().abs().sum() for l in model.engram_layers.values())
                                    / count)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="an Engram run directory or checkpoint (e.g. make demo's)")
    p.add_argument("--formats", nargs="+", default=DEFAULT_FORMATS, choices=sorted(FORMATS))
    p.add_argument("--batches", type=int, default=40, help="validation batches (default 40)")
    p.add_argument("--batch", type=int, default=4, help="prompts decoded at once (default 4)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per round (default 48)")
    p.add_argument("--rounds", type=int, default=7, help="timed decode rounds (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if "float32" not in args.formats:
        args.formats = ["float32", *args.formats]

    reference = load_checkpoint(args.ckpt)
    tc = reference.run_config.train
    val = checkpoint_data(reference).val
    ids = next(iter(val.eval_batches(args.batch, args.prompt, 1)))[0]  # (B, prompt) real held-out text
    prompts = [row.tolist() for row in ids]
    device_loss = evaluate(reference.model, val, tc.batch_size, tc.seq_len, args.batches, torch.device("cpu"))
    results, models, handles = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="engram-quant-") as tmp:
        for name in args.formats:
            fmt = FORMATS[name]
            directory = Path(tmp) / name
            export_tables(reference.model, directory, dtype=name, source={
                "path": str(reference.path), "step": reference.step, "identity": reference.identity})
            on_disk = sum(f.stat().st_size for f in directory.glob("layer_*.bin"))
            ckpt = load_checkpoint(args.ckpt)
            handles.append(apply_storage(ckpt.model, "disk", directory, checkpoint=ckpt.identity))
            loss = evaluate(ckpt.model, val, tc.batch_size, tc.seq_len, args.batches, torch.device("cpu"))
            dims = sorted({layer.embedding.dim for layer in ckpt.model.engram_layers.values()})
            results[name] = {"bytes": on_disk, **row_errors(reference.model, fmt),
                             "val_loss": loss["val_loss"], "val_loss_change": loss["val_loss"] - device_loss["val_loss"],
                             "row_bytes": {str(d): fmt.row_bytes(d) for d in (*dims, 80, 256)}}
            models[name] = ckpt.model
        tokens = {name: generate_batch(m, prompts, args.new_tokens, temperature=0.0) for name, m in models.items()}
        ratios = {name: [] for name in models}
        seconds = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                generate_batch(model, prompts, args.new_tokens, temperature=0.0)
                seconds[name].append(time.perf_counter() - start)
            for name in models:
                ratios[name].append(seconds["float32"][-1] / seconds[name][-1])
        for handle in handles:
            handle.close()
    fp32 = results["float32"]
    for name, r in results.items():
        r["size_vs_fp32"] = fp32["bytes"] / r["bytes"]
        r["decode_tokens_per_s"] = args.batch * args.new_tokens / statistics.median(seconds[name])
        r["decode_vs_fp32"] = statistics.median(ratios[name])
        r["decode_vs_fp32_range"] = [min(ratios[name]), max(ratios[name])]
        r["same_greedy_tokens_as_fp32"] = tokens[name] == tokens["float32"]

    print(f"checkpoint {reference.path} (step {reference.step}); device-table val loss {device_loss['val_loss']:.4f} "
          f"over {args.batches} batches; decode: {args.batch} prompts x {args.new_tokens} greedy tokens, "
          f"{args.rounds} paired rounds, {args.threads} thread(s), disk tier, warm page cache")
    dims = list(next(iter(results.values()))["row_bytes"])
    print(f"{'format':<10} {'bytes':>10} {'x smaller':>9} " + " ".join(f"{'B/row d=' + d:>11}" for d in dims)
          + f" {'max err':>9} {'mean err':>9} {'val loss':>9} {'change':>9} {'decode tok/s':>12} {'vs fp32':>15}"
          f" {'same tokens':>11}")
    for name, r in results.items():
        lo, hi = r["decode_vs_fp32_range"]
        print(f"{name:<10} {r['bytes']:>10,} {r['size_vs_fp32']:>8.2f}x "
              + " ".join(f"{r['row_bytes'][d]:>11}" for d in dims)
              + f" {r['max_abs_error']:>9.2e} {r['mean_abs_error']:>9.2e} {r['val_loss']:>9.4f} "
              f"{r['val_loss_change']:>+9.5f} {r['decode_tokens_per_s']:>12.1f} "
              f"{r['decode_vs_fp32']:>5.2f}x [{lo:.2f}-{hi:.2f}] {str(r['same_greedy_tokens_as_fp32']):>11}")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoint": str(reference.path), "device": device_loss,
                                               "args": vars(args), "formats": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
