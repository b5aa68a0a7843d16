"""Supervised stages of InstructGPT in the learner: SFT and reward-model training.

Pure torch + transformers (no gRPC). Both follow the paper's recipes
(Ouyang et al. 2022, appendix C):

SFT (C.1): next-token loss on the completion tokens only (prompt tokens are
masked out of the loss), AdamW, cosine LR decay to 10% of the peak, residual
dropout during training, validation loss after every epoch and the
checkpoint chosen by a criterion (lowest validation loss, or the last epoch).

RM (C.2): the LM backbone with a scalar head; for each prompt, the K ranked
completions are scored in one forward pass and all C(K,2) pairs of that
prompt form ONE batch element of the loss
    -1/C(K,2) * sum_{(w,l)} log sigmoid(r_w - r_l)
(`alignd.rlmath.rm_loss`), one epoch, cosine LR to 10%. Afterwards a bias is
set so that the demonstrations score 0 on average (the paper normalises the
RM so that labeler demonstrations achieve a mean score of 0 before RL);
alignd stores it in the checkpoint's config as `alignd_score_bias`, which the
reward role adds to every score, because Hugging Face's `score` heads have no
bias parameter.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from alignd import rlmath
from alignd.chat import ChatError, ChatFormat
from alignd.data.records import Prompt
from alignd.models.scoring import SCORE_BIAS_KEY, pooled_features, score_sequences
from alignd.services.learner.engine import adamw

IGNORE = -100


def cosine_to_floor(step: int, total: int, warmup: int = 0, *, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine from 1 to `floor` at `total` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_dropout(model: nn.Module, p: float) -> None:
    """Sets every dropout module (GPT-2's residual, attention and embedding dropout); no-op for models without."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def _update(model, opt, sched, *, loss: torch.Tensor, max_grad_norm: float) -> bool:
    """One optimizer step on `loss`; a non-finite gradient norm skips the update (the LR schedule still advances)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    applied = bool(torch.isfinite(norm))
    if applied:
        opt.step()
    sched.step()
    return applied


def _batches(items: Sequence, size: int, rng: random.Random | None) -> list[list]:
    order = list(range(len(items)))
    if rng is not None:
        rng.shuffle(order)
    return [[items[i] for i in order[k : k + size]] for k in range(0, len(order), size)]


# ---------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------


def _prompt_and_reply(tokenizer, prompt: Prompt, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (text or conversation) and its reply. With a ChatFormat (the jobs': the model's chat
    template, alignd.chat) as the policy sees them: the rendered prompt, the reply with the template's end of turn;
    with a bare tokenizer, the two texts tokenised apart."""
    if isinstance(tokenizer, ChatFormat):
        stops = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        try:
            return tokenizer.prompt_ids(prompt), tokenizer.response_ids(prompt, completion, stop_ids=stops)
        except ChatError as err:
            raise ValueError(str(err)) from None
    if not isinstance(prompt, str):
        raise ValueError("a conversation needs the model's chat format (model.chat_template), not a bare tokenizer")
    return (
        tokenizer(prompt, add_special_tokens=False)["input_ids"],
        tokenizer(completion, add_special_tokens=False)["input_ids"],
    )


def encode_demo(tokenizer, prompt: Prompt, completion: str, *, max_tokens: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are IGNORE on the prompt; the completion ends with EOS (rendered with a chat
    template: with the template's end of turn).

    The completion keeps up to max_tokens - 1 tokens (cut on the right); the
    prompt fills the rest, cut from the left (the end of a prompt matters most)
    and never empty, since the first completion token needs a context.
    """
    p, c = _prompt_and_reply(tokenizer, prompt, completion)
    templated = isinstance(tokenizer, ChatFormat) and tokenizer.templated
    if tokenizer.eos_token_id is not None and not (templated and c and c[-1] == tokenizer.eos_token_id):
        c = c + [tokenizer.eos_token_id]
    c = c[: max_tokens - 1]
    p = p[-(max_tokens - len(c)) :]
    return p + c, [IGNORE] * len(p) + c


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (T - len(s)) for s in seqs], dtype=torch.long)


def sft_loss(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over completion tokens; returns (loss, n_tokens)."""
    ids = _pad([x for x, _ in batch], pad_id)  # (B, L)
    labels = _pad([y for _, y in batch], IGNORE)  # (B, L)
    attn = (torch.arange(ids.shape[1])[None, :] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()  # (B, L)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()  # (B, L-1, V)
    target = labels[:, 1:]  # (B, L-1) token t+1 predicted at t
    mask = (target != IGNORE).float()  # (B, L-1)
    loss = rlmath.lm_loss(logits, target.clamp(min=0), mask)
    return loss, int(mask.sum())


@dataclass
class SupervisedResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch (and per logged step)
    best_epoch: int = 0
    best_metric: float = float("nan")
    best_state: dict | None = None  # parameters of the chosen checkpoint (CPU copies)
    extra: dict = field(default_factory=dict)


def _snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def sft_eval_loss(model, encoded, batch_size: int, *, pad_id: int) -> float:
    model.eval()
    total, n = 0.0, 0
    for batch in _batches(encoded, batch_size, None):
        loss, k = sft_loss(model, batch, pad_id)
        total += float(loss) * k
        n += k
    return total / max(1, n)


def train_sft(
    model,
    tokenizer,
    train: Sequence[tuple[str, str]],
    *,
    val: Sequence[tuple[str, str]],
    epochs: int,
    lr: float,
    batch_size: int,
    max_tokens: int,
    residual_dropout: float = 0.2,
    select: str = "val_loss",
    warmup_steps: int = 0,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    on_step: Callable[[dict], None] | None = None,
) -> SupervisedResult:
    """Fine-tunes `model` in place on (prompt, completion) pairs; loads the selected epoch's weights at the end."""
    if select not in ("val_loss", "last"):
        raise ValueError(f"select must be val_loss or last, got {select!r}")
    if select == "val_loss" and not val:
        raise ValueError("select=val_loss needs validation demonstrations")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc_train = [encode_demo(tokenizer, p, c, max_tokens=max_tokens) for p, c in train]
    enc_val = [encode_demo(tokenizer, p, c, max_tokens=max_tokens) for p, c in val]
    rng = random.Random(seed)
    total = epochs * math.ceil(len(enc_train) / batch_size)
    opt = adamw(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_to_floor(s, total, warmup_steps))
    result = SupervisedResult()
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        set_dropout(model, residual_dropout)
        run_loss, run_n = 0.0, 0
        for batch in _batches(enc_train, batch_size, rng):
            loss, k = sft_loss(model, batch, pad)
            _update(model, opt, sched, loss=loss, max_grad_norm=max_grad_norm)
            step += 1
            run_loss += float(loss.detach()) * k
            run_n += k
            if on_step:
                on_step(
                    {
                        "stage": "sft",
                        "step": step,
                        "total_steps": total,
                        "loss": float(loss),
                        "lr": sched.get_last_lr()[0],
                    }
                )
        set_dropout(model, 0.0)
        val_loss = sft_eval_loss(model, enc_val, batch_size, pad_id=pad) if enc_val else float("nan")
        row = {"epoch": epoch, "step": step, "train_loss": run_loss / max(1, run_n), "val_loss": val_loss}
        result.history.append(row)
        metric = val_loss if select == "val_loss" else -epoch
        if result.best_state is None or metric < result.best_metric:
            result.best_epoch, result.best_metric, result.best_state = epoch, metric, _snapshot(model)
    model.load_state_dict(result.best_state)
    model.eval()
    return result


# ---------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------


def encode_pair(tokenizer, prompt: Prompt, completion: str, *, max_tokens: int) -> tuple[list[int], int]:
    """(prompt + completion tokens, index of the first completion token); the prompt is cut from the left to fit.
    With a ChatFormat, rendered as the reward role scores a conversation (alignd.chat)."""
    p, c = _prompt_and_reply(tokenizer, prompt, completion)
    c = c[: max_tokens - 1]
    keep = max_tokens - len(c)
    p = p[-keep:] if keep > 0 else []
    return p + c, len(p)


def _score_pairs(model, tokenizer, pairs: list[tuple[list[int], int]]) -> torch.Tensor:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return score_sequences(model, [s for s, _ in pairs], pad, starts=[b for _, b in pairs])


def _encode_comparisons(tokenizer, comps, max_tokens: int) -> tuple[list[tuple[list[int], int]], list[int]]:
    """encode_pair of every completion of every comparison, and the K of each."""
    pairs, sizes = [], []
    for prompt, completions, _ranking in comps:
        pairs += [encode_pair(tokenizer, prompt, c, max_tokens=max_tokens) for c in completions]
        sizes.append(len(completions))
    return pairs, sizes


def comparison_rewards(model, tokenizer, comps, *, max_tokens: int) -> list[torch.Tensor]:
    """One forward over every completion of every comparison; rewards split per prompt."""
    pairs, sizes = _encode_comparisons(tokenizer, comps, max_tokens)
    scores = _score_pairs(model, tokenizer, pairs)  # (sum K,)
    return list(torch.split(scores, sizes))


def _pair_counts(rewards_list, rankings) -> tuple[int, int]:
    """(pairs ordered like the ranking, all pairs) over prompts."""
    right = total = 0
    for rewards, ranking in zip(rewards_list, rankings):
        for better, worse in rlmath.ranking_pairs(ranking):
            right += int(rewards[better] > rewards[worse])
            total += 1
    return right, total


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, comps, *, max_tokens: int, batch_size: int = 8) -> float:
    """Fraction of the C(K,2) pairs of every ranking that the model orders like the labeler."""
    model.eval()
    right = total = 0
    for batch in _batches(list(comps), batch_size, None):
        r, t = _pair_counts(comparison_rewards(model, tokenizer, batch, max_tokens=max_tokens), [c[2] for c in batch])
        right, total = right + r, total + t
    return right / max(1, total)


def train_rm(
    model,
    tokenizer,
    train: Sequence[tuple[str, Sequence[str], Sequence[int]]],
    *,
    val: Sequence[tuple[str, Sequence[str], Sequence[int]]],
    lr: float,
    batch_size: int,
    max_tokens: int,
    epochs: int = 1,
    warmup_steps: int = 0,
    betas: tuple[float, float] = (0.9, 0.95),
    max_grad_norm: float = 1.0,
    seed: int = 0,
    demonstrations: Sequence[tuple[str, str]] = (),
    on_step: Callable[[dict], None] | None = None,
    unit_std: bool = False,
) -> SupervisedResult:
    """Trains the scalar-head `model` in place on (prompt, completions, ranking) triples.

    batch_size counts prompts (each with all its pairs). Returns history, the
    held-out pairwise accuracy before and after, and the demonstration bias.
    """
    set_dropout(model, 0.0)
    rng = random.Random(seed)
    total = epochs * math.ceil(len(train) / batch_size)
    opt = adamw(model.parameters(), lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_to_floor(s, total, warmup_steps))
    result = SupervisedResult()
    result.extra["val_accuracy_before"] = (
        pairwise_accuracy(model, tokenizer, val, max_tokens=max_tokens) if val else float("nan")
    )
    step = 0
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in _batches(list(train), batch_size, rng):
            rewards = comparison_rewards(model, tokenizer, batch, max_tokens=max_tokens)
            loss = rlmath.rm_loss(rewards, [r for _p, _c, r in batch])
            _update(model, opt, sched, loss=loss, max_grad_norm=max_grad_norm)
            step += 1
            if on_step:
                on_step(
                    {
                        "stage": "rm",
                        "step": step,
                        "total_steps": total,
                        "loss": float(loss),
                        "lr": sched.get_last_lr()[0],
                    }
                )
        acc = pairwise_accuracy(model, tokenizer, val, max_tokens=max_tokens) if val else float("nan")
        result.history.append({"epoch": epoch, "step": step, "val_accuracy": acc})
    model.eval()
    result.best_epoch = epochs
    result.best_metric = result.history[-1]["val_accuracy"] if result.history else float("nan")
    result.extra["val_accuracy"] = result.best_metric
    result.extra["train_accuracy"] = (
        pairwise_accuracy(model, tokenizer, train, max_tokens=max_tokens) if train else float("nan")
    )
    if unit_std and train:
        result.extra["score_scale"] = scale_to_unit_std(
            model, _training_scores(model, tokenizer, train, max_tokens=max_tokens)
        )
    bias = demonstration_bias(model, tokenizer, demonstrations, max_tokens=max_tokens) if demonstrations else 0.0
    setattr(model.config, SCORE_BIAS_KEY, bias)
    result.extra["score_bias"] = bias
    return result


@torch.no_grad()
def scale_to_unit_std(model, scores: torch.Tensor) -> float:
    """Divides the scalar head (weight and bias) by the standard deviation of `scores` (N,), the RM's scores of its
    training completions, so that those have standard deviation 1 (Ziegler et al. 2019 normalise the reward on the
    initial policy's samples so); returns the factor applied (1.0 when the scores do not vary)."""
    sd = float(scores.double().std()) if scores.numel() > 1 else 0.0
    if not math.isfinite(sd) or sd <= 1e-12:
        return 1.0
    head = model.score
    head.weight.div_(sd)
    if getattr(head, "bias", None) is not None:
        head.bias.div_(sd)
    return 1.0 / sd


@torch.no_grad()
def _training_scores(
    model, tokenizer, train, *, max_tokens: int, limit: int = 2048, batch_size: int = 16
) -> torch.Tensor:
    """The RM's scores of (up to `limit`, evenly spread) completions of its training comparisons."""
    model.eval()
    pairs, _ = _encode_comparisons(tokenizer, train, max_tokens)
    pairs = pairs[:: max(1, math.ceil(len(pairs) / limit))]
    out = [_score_pairs(model, tokenizer, pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def demonstration_bias(
    model, tokenizer, demos: Sequence[tuple[str, str]], *, max_tokens: int, batch_size: int = 16
) -> float:
    """-mean raw score of the demonstrations: added to every score, demonstrations average 0."""
    model.eval()
    scores = []
    for batch in _batches(list(demos), batch_size, None):
        scores.append(
            _score_pairs(model, tokenizer, [encode_pair(tokenizer, p, c, max_tokens=max_tokens) for p, c in batch])
        )
    return -float(torch.cat(scores).mean()) if scores else 0.0


def truncate_layers(model: nn.Module, n: int) -> int:
    """Keeps the first `n` transformer blocks of a transformers model (an RM smaller than the model it starts
    from: the paper's 6B RM for a 175B policy); returns the number of blocks it had. The final norm and the
    head stay; config.json records the new depth, so the saved directory loads as the smaller model."""
    base = model.base_model
    for attr in ("layers", "h", "layer", "blocks"):
        blocks = getattr(base, attr, None)
        if isinstance(blocks, nn.ModuleList):
            break
    else:
        raise ValueError(f"{type(base).__name__}: no list of transformer blocks (layers, h, layer, blocks) to truncate")
    before = len(blocks)
    if n < 1:
        raise ValueError(f"layers must be >= 1, got {n}")
    if n < before:
        setattr(base, attr, blocks[:n])
        model.config.num_hidden_layers = n
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = list(model.config.layer_types)[:n]
    return before


@torch.no_grad()
def _features(
    model, tokenizer, comps, *, max_tokens: int, batch_size: int, on_batch: Callable[[int, int], None] | None = None
) -> tuple[torch.Tensor, list[int]]:
    """Pooled features (sum K, H) of every completion of every comparison, and the K of each; on_batch(done, of)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs, sizes = _encode_comparisons(tokenizer, comps, max_tokens)
    # Each distinct sequence once: the same completions ranked by several labelers share their features.
    index: dict[tuple, int] = {}
    rows = [index.setdefault((tuple(s), b), len(index)) for s, b in pairs]
    unique = list(index)
    chunks = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
    feats = []
    for done, chunk in enumerate(chunks, 1):
        feats.append(pooled_features(model, [list(s) for s, _ in chunk], [b for _, b in chunk], pad_id=pad).double())
        if on_batch:
            on_batch(done, len(chunks))
    if not feats:
        return torch.zeros(0, model.config.hidden_size, dtype=torch.float64), sizes
    return torch.cat(feats)[torch.tensor(rows, dtype=torch.long)], sizes


def _pair_accuracy(scores: torch.Tensor, sizes: list[int], rankings) -> float:
    right, total = _pair_counts(torch.split(scores, sizes), rankings)
    return right / max(1, total)


def fit_rm_head(
    model,
    tokenizer,
    train: Sequence[tuple[str, Sequence[str], Sequence[int]]],
    *,
    val: Sequence[tuple[str, Sequence[str], Sequence[int]]],
    l2: float,
    max_tokens: int,
    batch_size: int = 16,
    max_iterations: int = 200,
    demonstrations: Sequence[tuple[str, str]] = (),
    unit_std: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> SupervisedResult:
    """Fits only the scalar head, the backbone frozen: the same loss as `train_rm` (rlmath.rm_loss, all pairs of a
    prompt one element) plus l2 * |w|^2 on the standardised features, minimised by L-BFGS over all comparisons
    at once (deterministic; the features are computed once). With a few hundred noisy comparisons, fine-tuning
    the backbone overfits where a regularised linear head generalises (docs/real-model-preset.md)."""
    set_dropout(model, 0.0)
    result = SupervisedResult()

    report = on_step and (lambda i, n: on_step({"stage": "rm", "phase": "features", "step": i, "total_steps": n}))
    x_train, k_train = _features(model, tokenizer, train, max_tokens=max_tokens, batch_size=batch_size, on_batch=report)
    x_val, k_val = _features(model, tokenizer, val, max_tokens=max_tokens, batch_size=batch_size)
    head = model.score.weight  # (1, H)
    if val:
        result.extra["val_accuracy_before"] = _pair_accuracy(
            x_val @ head.detach().double()[0], k_val, [r for *_, r in val]
        )
    else:
        result.extra["val_accuracy_before"] = float("nan")
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # (H,)
    z = (x_train - mu) / sd
    rankings = [list(r) for *_, r in train]
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = rlmath.rm_loss(list(torch.split(z @ w, k_train)), rankings) + l2 * (w * w).sum()
        loss.backward()
        return loss

    loss = float(opt.step(closure).detach())
    with torch.no_grad():
        raw = (w / sd).to(head.dtype)  # the head on unstandardised features; the constant -w.mu/sd is in the bias
        head.copy_(raw[None, :])
    result.extra["train_accuracy"] = (
        _pair_accuracy(x_train @ raw.double(), k_train, rankings) if train else float("nan")
    )
    acc = _pair_accuracy(x_val @ raw.double(), k_val, [r for *_, r in val]) if val else float("nan")
    result.history.append({"epoch": 1, "step": 1, "val_accuracy": acc, "train_loss": loss})
    result.best_epoch, result.best_metric = 1, acc
    result.extra["val_accuracy"] = acc
    model.eval()
    if unit_std and train:
        result.extra["score_scale"] = scale_to_unit_std(model, x_train @ raw.double())
    bias = demonstration_bias(model, tokenizer, demonstrations, max_tokens=max_tokens) if demonstrations else 0.0
    setattr(model.config, SCORE_BIAS_KEY, bias)
    result.extra["score_bias"] = bias
    return result
