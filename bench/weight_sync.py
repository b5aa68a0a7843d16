"""Weight sync: ModelService.UpdateWeights over loopback vs copying the same bytes in-process.

Run: .venv/bin/python bench/weight_sync.py [--out bench/results/weight_sync.json] [--rounds 3]

For two models, the tiny built-in GPT-2 and a GPT-2 of about 124M parameters
(GPT-2 small's shape, random weights), it starts a real policy role
(`alignd serve policy`) and measures, side by side in one run:
  - grpc:       push_weights(channel, state_dict, version): the learner's
                code path (1 MiB chunks, SHA-256 trailer, validation, swap);
  - in-process: the same state dict copied into a second in-process model
                with `copy_` (the floor any transport is compared with).
It prints the time and MB/s of each and their ratio, and saves JSON.
Target (issue 3): >= 500 MB/s on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_gpt2_small(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignd.models.tiny import build_tokenizer

    tok = build_tokenizer(512)
    cfg = GPT2Config(
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def start_policy(model_dir: Path, work: Path):
    from conftest import start_role

    return start_role("policy", {"model": {"path": str(model_dir)}, "torch_threads": 1}, work)


def measure(model_dir: Path, work: Path, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    from alignd.models.weights import push_weights, unique_tensors

    from conftest import stop_role

    src = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    dst = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    state = src.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in unique_tensors(state).values())
    params = sum(p.numel() for p in src.parameters())
    server = start_policy(model_dir, work)
    grpc_s, copy_s = [], []
    try:
        version = 0
        for _ in range(rounds):
            version += 1
            t0 = time.perf_counter()
            resp = push_weights(server.channel, state, version)
            grpc_s.append(time.perf_counter() - t0)
            assert resp.version == version and resp.received_bytes == nbytes
            dst_state = dst.state_dict()
            t0 = time.perf_counter()
            with torch.no_grad():
                for name, t in unique_tensors(state).items():
                    dst_state[name].copy_(t)
            copy_s.append(time.perf_counter() - t0)
    finally:
        stop_role(server)
    g, c = statistics.median(grpc_s), statistics.median(copy_s)
    return {
        "parameters": params,
        "bytes": nbytes,
        "rounds": rounds,
        "grpc_seconds": g,
        "grpc_mb_per_s": nbytes / g / 1e6,
        "inprocess_copy_seconds": c,
        "inprocess_mb_per_s": nbytes / c / 1e6,
        "grpc_over_inprocess_time": g / c,
        "grpc_seconds_all": grpc_s,
        "inprocess_seconds_all": copy_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight_sync.json"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from alignd.models.handle import check_model_dir
    from alignd.runtime.malloc import tune_malloc

    tune_malloc()  # as every alignd process does at start (runtime/malloc.py)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {
            "tiny-gpt2": Path(check_model_dir("builtin:tiny-gpt2")),
            "gpt2-124M": build_gpt2_small(tmp / "gpt2small"),
        }
        for name, path in models.items():
            results[name] = measure(path, tmp / f"work-{name}", args.rounds)
            r = results[name]
            print(
                f"{name:10s} {r['parameters'] / 1e6:7.1f}M params {r['bytes'] / 1e6:8.1f} MB | "
                f"gRPC {r['grpc_seconds']:.3f}s {r['grpc_mb_per_s']:7.0f} MB/s | in-process copy "
                f"{r['inprocess_copy_seconds']:.3f}s {r['inprocess_mb_per_s']:7.0f} MB/s | ratio "
                f"{r['grpc_over_inprocess_time']:.1f}x",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "target_mb_per_s": 500,
    }
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
