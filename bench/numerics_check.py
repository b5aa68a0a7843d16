"""Are issue 8's numerical changes exact? Three checks on SmolLM2-135M (issue 18; after `make smollm2`).

    .venv/bin/python bench/numerics_check.py [--out bench/results/numerics_check.json]

Between 5a8b6b6 and 975258c the SmolLM2 preset's seed-0 result moved (bench/NOTES.md, "Why the SmolLM2
preset's result moved"). The changes that touch numbers, each checked against the computation it replaced:

1. Old log-probs from the rollouts: the policy role's sampled log-probs (KV cache, left padding, one token at a
   time) against the learner's recomputation (right padding, one forward pass, LM head at response positions), on
   16 Moby-Dick openings x 24 sampled tokens.
2. Inverse-CDF sampling against torch.multinomial: 40,000 draws of one real next-token distribution each; the
   total-variation distance of each to the exact distribution (sampling noise alone gives the multinomial's).
3. torch's fused AdamW against the for-each one: 5 steps of the same LM loss from the same weights; the largest
   parameter difference beside the largest update.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "libs"))


def model_dir() -> str:
    from alignd.assets import default_cache_dir as cache_dir

    path = cache_dir() / "models" / "smollm2-135m-instruct"
    if not path.exists():
        raise SystemExit(f"{path} not found: run `make smollm2` (or python -m alignd.assets) first")
    return str(path)


def rollout_logprobs(path: str) -> dict:
    from alignd.assets import default_cache_dir as cache_dir
    from alignd.config import ModelConfig
    from alignd.models.handle import ModelHandle, load_causal_lm, load_tokenizer
    from alignd.models.heads import response_positions
    from alignd.services.learner.model import PolicyValue
    from alignd.services.policy.engine import PolicyEngine, Row, Sampling

    cfg = ModelConfig(path=path)
    tok, model = load_tokenizer(cfg), load_causal_lm(cfg).eval()
    handle = ModelHandle("policy", cfg, model, tokenizer=tok)
    lines = (cache_dir() / "data" / "moby-dick-openings.train.jsonl").read_text().splitlines()[:16]
    texts = [json.loads(x)["prompt"] for x in lines]
    s = Sampling(1.0, 1.0, 0, 24, frozenset(), True)
    rows = [Row(tok(t)["input_ids"], s, 100 + i) for i, t in enumerate(texts)]
    res, _ = PolicyEngine(handle, 16).generate(rows)
    seqs = [r.prompt_ids + x.token_ids for r, x in zip(rows, res)]
    B, L, T = len(rows), max(map(len, seqs)), max(len(x.token_ids) for x in res)
    ids = torch.full((B, L), handle.pad_token_id)
    att = torch.zeros((B, L), dtype=torch.long)
    resp, roll, mask = torch.zeros((B, T), dtype=torch.long), torch.zeros((B, T)), torch.zeros((B, T))
    for i, sq in enumerate(seqs):
        R = len(res[i].token_ids)
        ids[i, : len(sq)], att[i, : len(sq)] = torch.tensor(sq), 1
        resp[i, :R], roll[i, :R], mask[i, :R] = torch.tensor(res[i].token_ids), torch.tensor(res[i].logprobs), 1
    pos = response_positions([(len(r.prompt_ids), len(x.token_ids)) for r, x in zip(rows, res)], T)
    with torch.no_grad():
        lp, _, _ = PolicyValue(model, None).eval()(ids, att, pos, response=resp, temperature=1.0)
    d = (lp - roll) * mask
    return {
        "tokens": int(mask.sum()),
        "max_abs_difference": float(d.abs().max()),
        "mean_difference": float(d.sum() / mask.sum()),
        "mean_logprob": float((lp * mask).sum() / mask.sum()),
    }


def sampler(path: str, draws: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignd.services.policy.engine import Sampling, sample_token

    tok, m = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tok("Call me Ishmael. Some years ago, never mind how long precisely, having", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = m(ids).logits[0, -1].float()
    probs = torch.softmax(logits, -1)
    s = Sampling(1.0, 1.0, 0, 1, frozenset(), True)
    g = torch.Generator().manual_seed(1)
    inv = torch.tensor([sample_token(logits, s, g)[0] for _ in range(draws)])
    mult = torch.multinomial(probs, draws, replacement=True, generator=torch.Generator().manual_seed(2))

    def tv(x):
        return 0.5 * float((torch.bincount(x, minlength=probs.numel()).float() / draws - probs).abs().sum())

    return {
        "draws": draws,
        "entropy_nats": float(-(probs * probs.clamp_min(1e-30).log()).sum()),
        "tv_inverse_cdf": tv(inv),
        "tv_multinomial": tv(mult),
    }


def adamw(path: str) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m0 = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, m0.config.vocab_size, (4, 32))
    out = {}
    for fused in (False, True):
        m = copy.deepcopy(m0).train()
        opt = torch.optim.AdamW(m.parameters(), lr=2e-5, fused=fused or None)
        for _ in range(5):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        out[fused] = {n: p.detach() for n, p in m.named_parameters()}
    start = {n: p.detach() for n, p in m0.named_parameters()}
    return {
        "steps": 5,
        "max_abs_difference": max(float((out[True][n] - out[False][n]).abs().max()) for n in start),
        "max_update": max(float((out[True][n] - start[n]).abs().max()) for n in start),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "numerics_check.json"))
    ap.add_argument("--draws", type=int, default=40000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = model_dir()
    t0 = time.perf_counter()
    result = {
        "model": "smollm2-135m-instruct",
        "rollout_logprobs": rollout_logprobs(path),
        "sampler": sampler(path, args.draws),
        "adamw": adamw(path),
    }
    result["seconds"] = time.perf_counter() - t0
    from alignd.atomic import write_json_atomic

    write_json_atomic(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
