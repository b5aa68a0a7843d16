"""What one PPO iteration's pieces cost with SmolLM2-135M-Instruct (fp32) on this CPU.

Run (from the repository root, after setup prepared the assets, see
libs/alignd/assets.py; the LoRA rows need `pip install peft==0.21.2` and are
left out without it):

    .venv/bin/python bench/smollm2_timings.py [--threads 2,1] [--repeats 3] [--quick]
        [--only KEY,...] [--out bench/results/smollm2_timings.json] [--quiet-wait-s 60]

Measures, for each torch thread count (default 2 then 1):

- load: `from_pretrained` of the converted model directory (+ tokenizer);
- generate: 16 prompts (real Moby-Dick openings, left-padded) x 24 new
  tokens with a KV cache, sampling at temperature 1, EOS ignored: Hugging
  Face `generate`, and alignd's own `PolicyEngine` (what the policy role runs);
- train step: forward + backward + AdamW step on 16 x (32 prompt + 24
  response) tokens, loss = mean response-token NLL (the PPO policy loss has
  the same graph): full fine-tuning, LoRA r=8 on every linear layer of the
  blocks (peft), and LoRA with logits for the response positions only
  (`logits_to_keep`: the 49,152-way LM head is a fifth of the FLOPs);
- alignd's `PPOTrainer.step` (value head on the policy, 1 epoch, 2
  minibatches) on the same 16 x 56 batch, full and LoRA;
- reference: a no-grad forward with per-token log-probs, 16 x 56 tokens
  (alignd's `ReferenceEngine`);
- judges: VADER, AFINN and TextBlob on 16 prompt + continuation texts.

Each timing is the median of `--repeats` runs after one warm-up. The machine
may be shared: before each timed block the script waits (within
--quiet-wait-s in all) for other processes to go idle, and it records the CPU
that other processes used during each block (`foreign`, as a fraction of all
cores) and the load average; a number with foreign > 0.05 is flagged `*`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from _hf import hf_sampling
from _proc import HZ, process_ticks, system_ticks

NCPU = os.cpu_count() or 1


class Meter:
    def __init__(self, quiet_budget_s: float) -> None:
        self.budget = quiet_budget_s
        self.waited = 0.0

    def snap(self):
        return time.perf_counter(), system_ticks()[0], process_ticks()

    @staticmethod
    def foreign(a, b) -> float:
        wall = max(b[0] - a[0], 1e-9)
        return max(0, (b[1] - a[1]) - (b[2] - a[2])) / HZ / (wall * NCPU)

    def wait_quiet(self) -> None:
        while self.waited < self.budget:
            a = self.snap()
            time.sleep(0.5)  # a measurement window
            self.waited += 0.5
            if self.foreign(a, self.snap()) < 0.03:
                return


def timed(meter: Meter, fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times, foreign = [], []
    for _ in range(repeats):
        meter.wait_quiet()
        a = meter.snap()
        fn()
        b = meter.snap()
        times.append(b[0] - a[0])
        foreign.append(Meter.foreign(a, b))
    return {
        "s": statistics.median(times),
        "all_s": [round(t, 3) for t in times],
        "foreign": round(max(foreign), 3),
        "load1": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model-dir", default=None, help="converted model directory (default: alignd.assets.ensure_smollm2())"
    )
    ap.add_argument("--prompts", default=None, help="prompts JSONL (default: alignd.assets.ensure_prompt_corpus())")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="1 repeat, skip the PPOTrainer rows")
    ap.add_argument("--quiet-wait-s", type=float, default=60.0)
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated row keys to measure (e.g. ppo_step_full,ppo_step_lora); default all",
    )
    ap.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    only = set(args.only.split(",")) if args.only else None

    def want(key: str) -> bool:
        return only is None or key in only

    t0 = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from alignd import assets

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    import_s = time.perf_counter() - t0

    model_dir = Path(args.model_dir) if args.model_dir else assets.ensure_smollm2()
    prompts_path = Path(args.prompts) if args.prompts else assets.ensure_prompt_corpus()
    texts = [json.loads(line)["prompt"] for line in prompts_path.read_text(encoding="utf-8").splitlines()[: args.batch]]
    B, P, R = args.batch, args.prompt_len, args.new_tokens
    meter = Meter(args.quiet_wait_s)
    results: dict = {
        "machine": {
            "cpus": NCPU,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "load_at_start": os.getloadavg(),
        },
        "shape": {"batch": B, "prompt_tokens": P, "response_tokens": R},
        "import_s": round(import_s, 2),
        "threads": {},
    }
    try:
        import peft

        results["machine"]["peft"] = peft.__version__
    except ImportError:
        peft = None
    samples_shown = False

    def lora(model):
        cfg = peft.LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        return peft.get_peft_model(model, cfg)

    for T in [int(x) for x in args.threads.split(",")]:
        torch.set_num_threads(T)
        row: dict = {}
        results["threads"][T] = row
        print(f"-- {T} thread(s)", flush=True)

        def load():
            tok = AutoTokenizer.from_pretrained(str(model_dir))
            m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            return tok, m

        meter.wait_quiet()
        a = meter.snap()
        tok, model = load()
        b = meter.snap()
        row["load"] = {"s": b[0] - a[0], "foreign": round(Meter.foreign(a, b), 3), "load1": os.getloadavg()[0]}
        pad = tok.pad_token_id
        nparams = sum(p.numel() for p in model.parameters())
        results["machine"]["parameters"] = nparams

        # -- generation
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

        def hf_generate():
            with torch.inference_mode():
                return model.generate(**enc, **hf_sampling(R, pad))

        torch.manual_seed(0)
        if want("generate_hf"):
            row["generate_hf"] = timed(meter, hf_generate, args.repeats)
        if not samples_shown and want("samples"):
            out = hf_generate()
            conts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            results["samples"] = [{"prompt": p, "continuation": c} for p, c in zip(texts, conts)]
            samples_shown = True

        from alignd.config import ModelConfig
        from alignd.models.handle import ModelHandle
        from alignd.services.policy.engine import PolicyEngine, Row, Sampling

        handle = ModelHandle("bench", ModelConfig(path=str(model_dir)), model, tokenizer=tok)
        sampling = Sampling(1.0, 1.0, 0, R, frozenset(), False)
        prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        rows = [Row(ids, sampling, i) for i, ids in enumerate(prompt_ids)]
        engine = PolicyEngine(handle, max_batch_size=B)
        if want("generate_alignd"):
            row["generate_alignd"] = timed(meter, lambda: engine.generate(rows), args.repeats)

        # -- reference log-probs, 16 x (P + R)
        from alignd.services.reference.engine import Item, ReferenceEngine

        g = torch.Generator().manual_seed(1)
        ids = torch.randint(100, 40000, (B, P + R), generator=g)
        ref = ReferenceEngine(handle, max_batch_size=B)
        items = [Item(ids[i, :P].tolist(), ids[i, P:].tolist(), 1.0) for i in range(B)]
        if want("reference_logprobs"):
            row["reference_logprobs"] = timed(meter, lambda: ref.logprobs(items), args.repeats)

        # -- training steps, 16 x (P + R)
        def train_step_fn(m, params, keep: int = 0):
            opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
            mask = torch.ones_like(ids)

            def step():
                out = m(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep or 0)
                logits = (
                    out.logits[:, -(R + 1) : -1] if not keep else out.logits[:, :-1]
                )  # predict the R response tokens
                logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, P:, None]).squeeze(-1)
                loss = -logp.mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            return step

        model.train()
        full_params = [p for p in model.parameters() if p.requires_grad]
        if want("train_full"):
            row["train_full"] = timed(meter, train_step_fn(model, full_params), args.repeats)
        del full_params
        if peft is not None and (want("train_lora") or want("train_lora_keep")):
            _, fresh = load()
            lm = lora(fresh.train())
            lp = [p for p in lm.parameters() if p.requires_grad]
            results["machine"]["lora_trainable_parameters"] = sum(p.numel() for p in lp)
            if want("train_lora"):
                row["train_lora"] = timed(meter, train_step_fn(lm, lp), args.repeats)
            if want("train_lora_keep"):
                row["train_lora_keep"] = timed(meter, train_step_fn(lm, lp, keep=R + 1), args.repeats)
            del lm, lp, fresh

        # -- alignd's PPO step: value head on the policy, 1 epoch, 2 minibatches
        if not args.quick:
            from alignd.config import OptimizerConfig, PPOConfig
            from alignd.services.learner.engine import TorchEngine
            from alignd.services.learner.model import PolicyValue, disable_dropout
            from alignd.services.learner.ppo import PPOTrainer, collate

            cfg = PPOConfig(epochs=1, minibatches=2)
            prompts_l = [ids[i, :P].tolist() for i in range(B)]
            resp_l = [ids[i, P:].tolist() for i in range(B)]
            batch = collate(
                prompts_l, resp_l, [[-3.0] * R] * B, rollout_logprobs=[[-3.0] * R] * B, scores=[0.5] * B, pad_id=pad
            )

            def ppo_fn(policy):
                mod = PolicyValue(policy, None)
                disable_dropout(mod)
                trainer = PPOTrainer(mod, TorchEngine(mod, OptimizerConfig(), cfg.max_grad_norm), cfg, seed=0)
                return lambda: trainer.step(batch)

            if want("ppo_step_full"):
                _, fresh = load()
                row["ppo_step_full"] = timed(meter, ppo_fn(fresh), args.repeats)
                del fresh
            if peft is not None and want("ppo_step_lora"):
                _, fresh = load()
                row["ppo_step_lora"] = timed(meter, ppo_fn(lora(fresh)), args.repeats)
                del fresh
        model = handle = engine = ref = None  # freed (closures above refer to them)

    # -- judges on 16 prompt + continuation texts
    sample_texts = [s["prompt"] + s["continuation"] for s in results.get("samples", [])] or texts
    judges: dict = {}
    for name, fn in assets.JUDGES.items() if want("judges") else ():
        t = time.perf_counter()
        fn("warm up")
        init_s = time.perf_counter() - t
        judges[name] = timed(meter, lambda fn=fn: [fn(x) for x in sample_texts], max(args.repeats, 3))
        judges[name]["init_s"] = init_s
        judges[name]["scores"] = [round(fn(x), 3) for x in sample_texts]
    results["judges"] = judges

    # -- table
    tok_gen = B * R
    tok_all = B * (P + R)
    print()
    print(
        f"SmolLM2-135M-Instruct fp32, {results['machine']['parameters'] / 1e6:.1f}M parameters; "
        f"batch {B} x ({P} prompt + {R} response) tokens; median of {args.repeats}; load avg at start "
        f"{results['machine']['load_at_start'][0]:.2f}; import torch+transformers+alignd {import_s:.1f} s"
    )
    print(f"{'what':<44}" + "".join(f"{str(T) + ' thr s':>12}{'tok/s':>9}" for T in results["threads"]))
    labels = [
        ("load", "load (from_pretrained + tokenizer)", None),
        ("generate_hf", f"generate HF, {B} x {R} new (KV cache)", tok_gen),
        ("generate_alignd", f"generate alignd PolicyEngine, {B} x {R} new", tok_gen),
        ("reference_logprobs", f"reference log-probs, {B} x {P + R}", tok_all),
        ("train_full", f"train full FT fwd+bwd+AdamW, {B} x {P + R}", tok_all),
        ("train_lora", f"train LoRA r={args.lora_r}, {B} x {P + R}", tok_all),
        ("train_lora_keep", f"train LoRA r={args.lora_r}, response logits only", tok_all),
        ("ppo_step_full", "alignd PPOTrainer.step full (1 ep, 2 mb)", tok_all),
        ("ppo_step_lora", f"alignd PPOTrainer.step LoRA r={args.lora_r}", tok_all),
    ]
    for key, label, ntok in labels:
        cells = ""
        present = False
        for row in results["threads"].values():
            r = row.get(key)
            if r is None:
                cells += f"{'-':>12}{'':>9}"
                continue
            present = True
            flag = "*" if r["foreign"] > 0.05 else " "
            cells += f"{r['s']:>11.2f}{flag}" + (f"{ntok / r['s']:>9.0f}" if ntok else f"{'':>9}")
        if present:
            print(f"{label:<44}{cells}")
    for name, r in judges.items():
        print(
            f"{'judge ' + name + ', 16 texts (ms)':<44}{r['s'] * 1000:>11.2f}{'*' if r['foreign'] > 0.05 else ' '}"
            f"   (first call incl. lexicon load {r['init_s'] * 1000:.0f} ms)"
        )
    if "lora_trainable_parameters" in results["machine"]:
        print(f"LoRA trainable parameters: {results['machine']['lora_trainable_parameters'] / 1e6:.2f}M")
    print("* other processes used > 5% of the cores during that measurement")
    for s in results.get("samples", [])[:4]:
        print(f"  {s['prompt']!r} -> {s['continuation']!r}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
