"""Generation side by side: the policy role on its transformers engine and on vLLM, and `model.generate` in process
(issue 21, item 6).

Run (from the repository root, after `make test`'s setup and, for SmolLM2, `make smollm2`'s assets):

    .venv/bin/python bench/generation.py [--models tiny,smollm2] [--repeats 3] [--out bench/results/generation.json]
    .venv/bin/python bench/generation.py --readme       # the README's table from the results file

For each model (fp32) and each case, a labeling round (128 prompts x 24 new tokens) and a PPO step (16 x 24):

- `model.generate` in this process (left-padded batch, sampling at temperature 1, exactly 24 new tokens);
- `alignd serve policy` with `engine: transformers`, then with `engine: vllm`, each called with one Generate
  request of all the prompts (temperature 1, EOS ignored) through the generated stubs, as the coordinator calls it.

Each figure is the median of --repeats timed runs after one warm-up, as generated tokens per second; the ratios are
to `model.generate` in the same run. Then the latency of a weight update of each engine: UpdateWeights streaming
the model's whole state dict (another seed's weights, then the first again), median of --repeats. One role runs at
a time. `--readme` rewrites the README block between `<!-- generation:begin -->` and `<!-- generation:end -->`;
tests/test_bench_generation.py checks that the committed README matches the committed results file.
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "generation.json"
README = ROOT / "README.md"
CASES = [("labeling round", 128, 24), ("PPO step", 16, 24)]
TEXTS = [
    "The quick brown fox",
    "Paris is",
    "Write a short story about a robot who learns to paint",
    "Explain the moon to a six year old",
    "What is the capital of France?",
    "Use the word river in a sentence:",
    "Thank you! Please answer the question.",
    "A reward model scores a response",
]
BEGIN, END = "<!-- generation:begin -->", "<!-- generation:end -->"


def model_dir(name: str) -> str:
    from alignd.models.tiny import resolve_builtin

    return resolve_builtin({"tiny": "builtin:tiny-gpt2", "smollm2": "builtin:smollm2-135m-instruct"}[name])


def prompt_ids(name: str, tok, n: int) -> list[list[int]]:
    if name == "smollm2":
        from alignd.datapaths import cache_dir

        lines = (cache_dir() / "data" / "moby-dick-openings.eval.jsonl").read_text().splitlines()
        texts = [json.loads(x)["prompt"] for x in lines if x.strip()]
    else:
        texts = TEXTS
    return [tok(texts[i % len(texts)], add_special_tokens=False)["input_ids"] for i in range(n)]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_generate(lm, tok, prompts: list[list[int]], new_tokens: int) -> None:
    import torch

    from _hf import hf_sampling

    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        lm.generate(input_ids=ids, attention_mask=mask, **hf_sampling(new_tokens, pad))


def serve_policy(engine: str, path: str, workdir: Path):
    """`alignd serve policy` of `path` on `engine`, in a directory of its own under workdir (a fresh endpoint file)."""
    from _auth import tokens_file, with_auth
    from _launch import await_serving, log_tail, spawn_serve

    cfg = {
        "model": {"path": path},
        "engine": engine,
        "torch_threads": os.cpu_count() or 1,
        "batching": {"max_batch_size": 128, "max_queue": 1024},
        "log_level": "warning",
    }
    d = workdir / engine
    proc, endpoint, log_path = spawn_serve("policy", with_auth(cfg, tokens_file(workdir)), d)
    _, channel = await_serving(
        proc, endpoint, time.monotonic() + 600, name=f"policy ({engine})", log_tail=lambda: log_tail(log_path, 40)
    )
    return proc, channel


def stop(proc, channel) -> None:
    import signal

    channel.close()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def request(prompts: list[list[int]], new_tokens: int, seed: int):
    from alignd.v1 import common_pb2, policy_pb2

    return policy_pb2.GenerateRequest(
        prompts=[policy_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=p)) for p in prompts],
        sampling=policy_pb2.SamplingParams(
            temperature=1.0, max_new_tokens=new_tokens, ignore_eos=True, seed=seed, num_samples=1
        ),
    )


def measure_model(name: str, repeats: int, workdir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignd.models.weights import push_weights
    from alignd.v1 import policy_pb2_grpc

    torch.set_num_threads(os.cpu_count() or 1)
    path = model_dir(name)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    other = {k: v + 1e-3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in lm.state_dict().items()}
    out: dict = {"model": name, "parameters": sum(p.numel() for p in lm.parameters()), "cases": []}
    for label, n, new in CASES:
        prompts = prompt_ids(name, tok, n)
        t = median_time(lambda: hf_generate(lm, tok, prompts, new), repeats)
        out["cases"].append({"case": label, "prompts": n, "new_tokens": new, "generate": {"seconds": t}})
    out["weight_update_seconds"] = {}
    for engine in ("transformers", "vllm"):
        t0 = time.perf_counter()
        proc, channel = serve_policy(engine, path, workdir / name)
        out.setdefault("start_seconds", {})[engine] = round(time.perf_counter() - t0, 1)
        try:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            for case in out["cases"]:
                prompts = prompt_ids(name, tok, case["prompts"])
                req = request(prompts, case["new_tokens"], seed=1)
                case[engine] = {"seconds": median_time(lambda: stub.Generate(req, timeout=900), repeats)}
            version = iter(range(1, 1000))
            states = iter([other, lm.state_dict()] * (repeats + 1))
            out["weight_update_seconds"][engine] = median_time(
                lambda: push_weights(channel, next(states), next(version)), repeats
            )
        finally:
            stop(proc, channel)
    for case in out["cases"]:
        tokens = case["prompts"] * case["new_tokens"]
        for key in ("generate", "transformers", "vllm"):
            case[key]["tokens_per_second"] = tokens / case[key]["seconds"]
        for key in ("transformers", "vllm"):
            case[key]["vs_generate"] = case["generate"]["seconds"] / case[key]["seconds"]
    return out


def render(data: dict) -> str:
    """The README's table: one row per model and case."""
    lines = [
        f"Generated tokens per second on {data['machine']['cpus']} CPU cores, fp32, temperature 1 "
        f"(`bench/generation.py` at {data['commit']}; ratio to `model.generate` in the same run):",
        "",
        "| model | case | `model.generate` | policy, transformers engine | policy, vLLM "
        "| weight update (transformers / vLLM) |",
        "|---|---|---|---|---|---|",
    ]
    for m in data["results"]:
        w = m["weight_update_seconds"]
        for i, c in enumerate(m["cases"]):
            update = f"{w['transformers']:.3f} s / {w['vllm']:.3f} s" if i == 0 else ""
            lines.append(
                f"| {m['model'] if i == 0 else ''} | {c['case']} ({c['prompts']} x {c['new_tokens']}) "
                f"| {c['generate']['tokens_per_second']:.0f} "
                f"| {c['transformers']['tokens_per_second']:.0f} ({c['transformers']['vs_generate']:.2f}x) "
                f"| {c['vllm']['tokens_per_second']:.0f} ({c['vllm']['vs_generate']:.2f}x) | {update} |"
            )
    return "\n".join(lines)


def rewrite_readme(text: str, data: dict) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render(data)}\n{END}{tail}"


def git_commit() -> str:
    import subprocess

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return sha.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--readme", action="store_true", help="rewrite the README's table from the results file")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    if args.readme:
        from alignd.atomic import write_bytes_atomic

        text = rewrite_readme(README.read_text(), json.loads(Path(args.out).read_text()))
        write_bytes_atomic(README, text.encode())
        print(f"rewrote {README}")
        return
    data = {
        "commit": git_commit(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "repeats": args.repeats,
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="alignd-bench-generation-") as tmp:
        for name in args.models.split(","):
            r = measure_model(name, args.repeats, Path(tmp))
            data["results"].append(r)
            for c in r["cases"]:
                print(
                    f"{name} {c['case']}: generate {c['generate']['tokens_per_second']:.0f} tok/s, transformers "
                    f"{c['transformers']['tokens_per_second']:.0f} ({c['transformers']['vs_generate']:.2f}x), vLLM "
                    f"{c['vllm']['tokens_per_second']:.0f} ({c['vllm']['vs_generate']:.2f}x)",
                    flush=True,
                )
            print(f"{name} weight update: {r['weight_update_seconds']}", flush=True)
    from alignd.atomic import write_json_atomic

    write_json_atomic(Path(args.out), data)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
