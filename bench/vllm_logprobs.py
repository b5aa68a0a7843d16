"""How far the vLLM engine's per-token log-probs are from the learner's recomputation (issue 21, item 4).

Run (from the repository root, after `make test`'s setup and, for SmolLM2, `make smollm2`'s assets):

    .venv/bin/python bench/vllm_logprobs.py [--models tiny,smollm2] [--prompts 32] [--tokens 24]
        [--out bench/results/vllm_logprobs.json]

For each model (fp32): the policy's vLLM engine (alignd.services.policy.vllm_engine.VllmEngine, what
`policy.engine: vllm` runs) samples `--prompts` prompts x `--tokens` new tokens at temperature 1 (EOS ignored), and
the log-prob it returns for each sampled token is compared with log_softmax of the transformers model's logits over
the same prompt + response, one forward per sample: the learner's recomputation (alignd.rlmath.lm). It prints and
saves the largest and the mean absolute difference over all tokens, and the same for alignd's transformers engine
(PolicyEngine) as the baseline; and how many of the same prompts' greedy samples (EOS ignored) equal
`model.generate`'s token for token. docs/vllm.md quotes the saved file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from generation import model_dir  # bench/ is on sys.path when a script runs
from generation import prompt_ids as prompts_for


def recomputed(lm, prompt: list[int], tokens: list[int]):
    import torch

    with torch.no_grad():
        logits = lm(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def differences(lm, prompts, rows, results) -> dict:
    import torch

    diffs = []
    for row, res in zip(rows, results):
        want = recomputed(lm, row.prompt_ids, res.token_ids)
        diffs.extend((want - torch.tensor(res.logprobs)).abs().tolist())
    return {"max_abs": max(diffs), "mean_abs": statistics.fmean(diffs), "tokens": len(diffs)}


def measure(name: str, n: int, tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignd.config import PolicyConfig
    from alignd.models.handle import ModelHandle
    from alignd.services.policy.engine import PolicyEngine, Row, Sampling
    from alignd.services.policy.servicer import row_seed
    from alignd.services.policy.vllm_engine import VllmEngine

    path = model_dir(name)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    prompts = prompts_for(name, tok, n)
    s = Sampling(1.0, 1.0, 0, tokens, frozenset(), True)
    rows = [Row(p, s, row_seed(0, i, 0)) for i, p in enumerate(prompts)]
    cfg = PolicyConfig(model={"path": path}, engine="vllm", torch_threads=os.cpu_count() or 1)
    t0 = time.perf_counter()
    engine = VllmEngine(cfg, max_context=min(lm.config.max_position_embeddings, 512))
    start = time.perf_counter() - t0
    greedy_s = Sampling(0.0, 1.0, 0, tokens, frozenset(), False)
    greedy_rows = [Row(p, greedy_s, 0) for p in prompts]
    try:
        vllm_results = engine.generate(rows, None)
        vllm_greedy = engine.generate(greedy_rows, None)
    finally:
        engine.close()
    same = 0
    for row, res in zip(greedy_rows, vllm_greedy):
        want = lm.generate(
            torch.tensor([row.prompt_ids]),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )[0, len(row.prompt_ids) :].tolist()
        same += int(res.token_ids[: len(want)] == want)  # generate stops at EOS; vLLM (EOS ignored) goes on
    handle = ModelHandle("policy", cfg.model, lm, tokenizer=tok)
    hf_results, _ = PolicyEngine(handle, 32).generate(rows)
    return {
        "model": name,
        "vllm": differences(lm, prompts, rows, vllm_results),
        "transformers_engine": differences(lm, prompts, rows, hf_results),
        "vllm_start_seconds": round(start, 1),
        "greedy_equal_to_generate": f"{same}/{len(greedy_rows)}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default="bench/results/vllm_logprobs.json")
    args = ap.parse_args()
    out = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "prompts": args.prompts,
        "new_tokens": args.tokens,
        "dtype": "float32",
        "results": [],
    }
    for name in args.models.split(","):
        r = measure(name, args.prompts, args.tokens)
        out["results"].append(r)
        print(
            f"{name}: vLLM max |diff| {r['vllm']['max_abs']:.3g} (mean {r['vllm']['mean_abs']:.3g}) over "
            f"{r['vllm']['tokens']} tokens; transformers engine max {r['transformers_engine']['max_abs']:.3g}; "
            f"greedy samples equal to model.generate: {r['greedy_equal_to_generate']}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
