"""Before/after of issue 8's fixes, each in isolation and in process (bench/NOTES.md).

    .venv/bin/python bench/ppo_profile.py [--out bench/results/ppo_profile.json]

SmolLM2-135M-Instruct (after `make smollm2`) as the policy, the reward model of bench/ppo_vs_trl.py
(`$ALIGND_CACHE/bench/smollm2-135m-rm`, built once with a seeded head) as the value model; 16 Moby-Dick prompts with
24-token responses, 2 torch threads, fp32: the shape of bench/ppo_vs_trl.py's SmolLM2 run. Medians of 3-5 calls:

- old_outputs: the learner's no-grad forward of policy and value model, against the value model alone (what a step
  does when the rollouts' log-probs serve as the old ones: ppo.old_logprobs auto, ppo.off_policy behaviour);
- adamw_step: one optimizer step over policy and value model parameters, torch's per-tensor loop (foreach) against
  the fused kernel;
- generate: the policy engine's 16 x 24 tokens with the former torch.multinomial sampler against inverse-CDF
  sampling;
- lm_head: the LM head over every position of the sequence against the response positions only
  (alignd.models.heads.PositionLogits), in a training minibatch's forward + backward (8 rows, policy and value) and
  in the policy's no-grad forward of all 16 rows (what the reference role does), interleaved, medians of 5.
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

ROOT = Path(__file__).resolve().parents[1]


def med(fn, n: int = 3) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo_profile.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    sys.path.insert(0, str(ROOT / "bench"))
    from ppo_vs_trl import smollm2_spec

    import alignd.services.policy.engine as E
    from alignd.config import LearnerConfig, PolicyConfig
    from alignd.models.handle import ModelHandle, load_causal_lm, load_tokenizer
    from alignd.services.learner.engine import adamw, param_groups
    from alignd.services.learner.learner import Learner
    from alignd.services.learner.ppo import collate

    spec = smollm2_spec(Path(tempfile.mkdtemp()))
    policy_dir, rm_dir = spec["policy"], spec["reward"]
    cfg = LearnerConfig.model_validate(
        {
            "model": {"path": str(policy_dir)},
            "value_model": {"path": str(rm_dir)},
            "value_head_on_policy": False,
            "ema_decay": None,
            "checkpoint_every_steps": 0,
            "ppo": {"minibatches": 2, "epochs": 1},
        }
    )
    learner = Learner(cfg, Path(tempfile.mkdtemp()))
    tok = learner.tokenizer
    prompts = [json.loads(x)["prompt"] for x in Path(spec["prompts"]).open()][:16]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    g = torch.Generator().manual_seed(0)
    responses = [torch.randint(100, 40000, (24,), generator=g).tolist() for _ in ids]
    lp = [[-3.0] * 24] * 16
    b = collate(
        ids, responses, lp, rollout_logprobs=lp, scores=[0.1] * 16, pad_id=0, versions=[0] * 16, rollout_exact=True
    )
    m = learner.module
    out: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": 2,
        "batch": 16,
        "response_tokens": 24,
    }
    with torch.no_grad():
        out["old_outputs_policy_and_value_s"] = med(
            lambda: m(b.input_ids, b.attention_mask, b.positions, response=b.response, temperature=1.0)
        )
        out["old_outputs_value_only_s"] = med(lambda: m.values(b.input_ids, b.attention_mask, b.positions))
    mb = b.select(torch.arange(8))
    logprobs, _, values = m(mb.input_ids, mb.attention_mask, mb.positions, response=mb.response, temperature=1.0)
    (logprobs.sum() + values.sum()).backward()
    for fused in (False, True):
        opt = adamw(param_groups(m, cfg.optimizer), fused, lr=1e-9)
        opt.step()  # the state is allocated on the first step
        out[f"adamw_step_{'fused' if fused else 'foreach'}_s"] = med(opt.step)
    opt.zero_grad(set_to_none=True)
    pl = m._position_logits
    split = pl.split

    def train_minibatch():
        logprobs, _, values = m(mb.input_ids, mb.attention_mask, mb.positions, response=mb.response, temperature=1.0)
        (logprobs.sum() + values.sum()).backward()
        m.zero_grad(set_to_none=True)

    def forward16():
        with torch.no_grad():
            m(b.input_ids, b.attention_mask, b.positions, response=b.response, temperature=1.0, with_values=False)

    # Interleaved (full, positions, full, ...) so that drift of the machine's speed hits both alike; the first
    # round is warm-up.
    times: dict[str, list[float]] = {}
    try:
        for _ in range(6):
            for name, sp in (("full", None), ("positions", split)):
                pl.split = sp
                for what, fn in (("train_minibatch", train_minibatch), ("forward16_policy", forward16)):
                    t = time.perf_counter()
                    fn()
                    times.setdefault(f"lm_head_{name}_{what}_s", []).append(time.perf_counter() - t)
    finally:
        pl.split = split
    out.update({k: statistics.median(v[1:]) for k, v in times.items()})
    print(json.dumps(out), flush=True)
    learner = m = opt = None  # freed before the next measurement (closures above refer to them)

    pcfg = PolicyConfig.model_validate({"model": {"path": str(policy_dir)}})
    engine = E.PolicyEngine(
        ModelHandle("policy", pcfg.model, load_causal_lm(pcfg.model), tokenizer=load_tokenizer(pcfg.model)), 128
    )
    rows = [E.Row(p, E.Sampling(1.0, 1.0, 0, 24, frozenset(), True), i) for i, p in enumerate(ids)]
    inverse_cdf = E.sample_token

    def multinomial(logits, s, gen):  # the sampler before issue 8
        logp = torch.log_softmax(E._truncate(logits / s.temperature, s.top_k, s.top_p), dim=-1)
        t = int(torch.multinomial(logp.exp(), 1, generator=gen))
        return t, float(logp[t])

    engine.generate(rows)
    try:
        for name, fn in (("multinomial", multinomial), ("inverse_cdf", inverse_cdf)):
            E.sample_token = fn
            out[f"generate_{name}_s"] = med(lambda: engine.generate(rows))
    finally:
        E.sample_token = inverse_cdf
    print(json.dumps(out, indent=1))
    from alignd.atomic import write_json_atomic

    write_json_atomic(Path(args.out), out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
