"""Loading Hugging Face models from a directory, and the served-model handle.

Every role loads its model with `from_pretrained` on a directory, the same
code path for a user's model and for the tiny models the tests save.
`ModelHandle` owns the model, its tokenizer, the weight version and the lock
that makes a weight swap atomic with respect to inference batches.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from alignd import __version__
from alignd.chat import ChatFormat
from alignd.config import ModelConfig
from alignd.models.scoring import SCORE_BIAS_KEY, score_bias
from alignd.runtime.errors import FailedPrecondition, InvalidArgument
from alignd.runtime.logging import get_logger
from alignd.v1 import common_pb2

_log = get_logger("alignd.models")

MAX_VERSION = (1 << 62) - 1  # weight versions are below 2^62 (the learner refuses larger ones too)
MAX_VERSION_JUMP = 1 << 20  # how far above its own version a replica accepts an update (docs/security.md)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_torch_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
        try:
            torch.set_num_interop_threads(max(1, min(n, 2)))
        except RuntimeError:  # already set once in this process
            pass


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (fast tokenizers) or vocab."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizer: vocab + special tokens
        import json

        text = json.dumps({"vocab": tokenizer.get_vocab(), "special": tokenizer.all_special_tokens}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_model_dir(path: str) -> Path:
    from alignd.models.tiny import resolve_builtin

    p = Path(resolve_builtin(path))
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model directory {p} has no config.json (expected a save_pretrained directory)")
    return p


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(check_model_dir(cfg.path)), trust_remote_code=cfg.trust_remote_code)
    return tok


def load_causal_lm(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(check_model_dir(cfg.path)), dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
    )
    return model.to(cfg.device).eval()


def load_meta_causal_lm(cfg: ModelConfig):
    """The causal LM of `cfg` without its weights (every tensor on the meta device): its names, shapes, dtypes and
    tied weights, for checking weight updates of an engine that holds the weights itself (vLLM)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = str(check_model_dir(cfg.path))
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    return model.eval()


def load_scalar_head_model(cfg: ModelConfig, *, allow_new_head: bool):
    """The LM backbone with a scalar head (`AutoModelForSequenceClassification`, 1 label).

    Refuses a directory whose checkpoint has no trained head unless
    `allow_new_head`: a randomly initialised reward is a silent bug.
    """
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(
        str(check_model_dir(cfg.path)),
        num_labels=1,
        dtype=DTYPES[cfg.dtype],
        trust_remote_code=cfg.trust_remote_code,
        output_loading_info=True,
    )
    if not hasattr(model, "score") or not isinstance(model.score, torch.nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no linear `score` head; alignd needs a sequence-classification head named "
            f"`score`"
        )
    if model.score.out_features != 1:
        raise ValueError(f"score head has {model.score.out_features} outputs; a reward model needs 1")
    missing_head = [k for k in info.get("missing_keys", []) if k.startswith("score.")]
    if missing_head and VALUE_HEAD_KEY in set(info.get("unexpected_keys", [])):
        _adopt_value_head(model, cfg.path)
        missing_head = []
    if missing_head:
        if not allow_new_head:
            raise ValueError(
                f"{cfg.path} has no trained scalar head ({', '.join(missing_head)} missing); "
                "train a reward model first or set allow_new_head: true"
            )
        _log.warning("reward_head_initialised", path=cfg.path)
    return model.to(cfg.device).eval()


VALUE_HEAD_KEY = "value_head.weight"  # OpenRLHF's reward models: a bias-free linear head named value_head


def _adopt_value_head(model, path: str) -> None:
    """Serves an OpenRLHF reward model as it is: its `value_head` (the same bias-free linear map of the last
    token's final hidden state as the `score` head of transformers' sequence classifiers) becomes `score`; with
    normalize_reward, its stored `mean` and `std` are folded in (score / std, bias -mean / std), so the served
    score is OpenRLHF's normalised reward."""
    from safetensors import safe_open

    wanted = {VALUE_HEAD_KEY, "mean", "std"}
    found: dict[str, torch.Tensor] = {}
    for f in _weight_files(str(check_model_dir(path))):
        with safe_open(str(f), framework="pt") as st:
            found.update({k: st.get_tensor(k) for k in st.keys() if k in wanted})
    head = found[VALUE_HEAD_KEY].reshape(1, -1)
    if head.shape[1] != model.score.in_features:
        raise ValueError(
            f"{VALUE_HEAD_KEY} has {head.shape[1]} inputs; the backbone's hidden size is {model.score.in_features}"
        )
    scale, bias = 1.0, 0.0
    if getattr(model.config, "normalize_reward", False) and "mean" in found and "std" in found:
        mean, std = float(found["mean"].reshape(-1)[0]), float(found["std"].reshape(-1)[0])
        if not std > 0:
            raise ValueError(f"{path}: normalize_reward with std {std}; it must be positive")
        scale, bias = 1.0 / std, -mean / std
    with torch.no_grad():
        model.score.weight.copy_(head.to(model.score.weight.dtype) * scale)
        if model.score.bias is not None:
            model.score.bias.zero_()
    if bias:
        setattr(model.config, SCORE_BIAS_KEY, score_bias(model) + bias)
    _log.info("value_head_adopted", path=path, normalized=bool(bias or scale != 1.0))


def context_limit(model, cfg: ModelConfig) -> int:
    mc = model.config
    limit = getattr(mc, "max_position_embeddings", None) or getattr(mc, "n_positions", None) or 2048
    if cfg.max_context_tokens:
        limit = min(limit, cfg.max_context_tokens)
    return int(limit)


def alias_groups(model) -> list[list[str]]:
    """State-dict names grouped by shared storage (tied weights form one group)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        # Meta tensors (a model whose weights live elsewhere: the vLLM engine's workers) have no storage to compare:
        # tied weights are the same Parameter object.
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() and not t.is_meta else (id(t), 0)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _weight_files(path: str) -> list[Path]:
    p = Path(path)
    if not p.is_dir():
        raise InvalidArgument("path", f"{path} is not a directory")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise InvalidArgument("path", f"{path} holds no *.safetensors files")
    return files


def read_weights_dir(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the `*.safetensors` files in `path`."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        out.update(load_file(str(f)))
    return out


def read_weights_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in `path`'s `*.safetensors` files, from their headers alone."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="pt") as st:
            out.update({name: tuple(st.get_slice(name).get_shape()) for name in st.keys()})
    return out


class ModelHandle:
    """The served model, its tokenizer and weight version.

    Inference holds `lock` for the duration of a batch; `apply_weights` takes
    the same lock, so a batch sees either the old weights or the new ones,
    never a mix, and reports the version it ran with.
    """

    engine_name = "transformers"  # ModelInfo.engine
    weight_group_ranks = 0  # ModelInfo.weight_group_ranks: this engine receives weights by stream or directory only

    def __init__(self, role: str, cfg: ModelConfig, model, *, tokenizer) -> None:
        self.role = role
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.version = 0
        self.lock = threading.RLock()
        self._update_lock = threading.Lock()
        self.device = torch.device(cfg.device)
        self.model_path = str(check_model_dir(cfg.path).resolve())
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        self.max_context = context_limit(model, cfg)
        self.tokenizer_hash = tokenizer_hash(tokenizer)
        self.chat = ChatFormat.resolve(tokenizer, cfg.chat_template)
        self.eos_token_id = (
            tokenizer.eos_token_id
            if tokenizer.eos_token_id is not None
            else getattr(model.config, "eos_token_id", None)
        )
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.config, "pad_token_id", None)
        if pad is None:
            pad = self.eos_token_id if self.eos_token_id is not None else 0
        self.pad_token_id = int(pad)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self._groups = alias_groups(model)
        # Set by roles whose LoadWeights may change the architecture (the reward role: an RM of another depth).
        self.reloader: Callable[[str], Any] | None = None

    def info(self) -> common_pb2.ModelInfo:
        return common_pb2.ModelInfo(
            role=self.role,
            model_name=self.cfg.name or Path(self.model_path).name,
            model_path=self.model_path,
            architecture=type(self.model).__name__,
            tokenizer_hash=self.tokenizer_hash,
            weight_version=self.version,
            vocab_size=self.vocab_size,
            max_context_tokens=self.max_context,
            num_parameters=self.num_parameters,
            dtype=self.cfg.dtype,
            device=str(self.device),
            eos_token_id=-1 if self.eos_token_id is None else int(self.eos_token_id),
            pad_token_id=self.pad_token_id,
            alignd_version=__version__,
            chat_template=self.chat.source,
            chat_template_sha256=self.chat.digest,
            engine=self.engine_name,
            weight_group_ranks=self.weight_group_ranks,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def begin_update(self) -> bool:
        """Claims the (single) update slot; False if an update is running."""
        return self._update_lock.acquire(blocking=False)

    def end_update(self) -> None:
        self._update_lock.release()

    def check_version(self, version: int, *, replace_newer: bool = False) -> None:
        """Versions only move forward, by at most MAX_VERSION_JUMP (a restarted replica serves 0 and is brought to
        the run's version in one update); `replace_newer` also allows a lower version: the learner re-syncing a
        replica that reports a version it never published."""
        if version > MAX_VERSION:
            raise InvalidArgument("version", f"{version} is above the largest weight version, {MAX_VERSION}")
        if replace_newer and 1 <= version < self.version:
            return
        if version <= self.version:
            raise FailedPrecondition(f"version {version} is not above the served version {self.version}")
        if version - self.version > MAX_VERSION_JUMP:
            raise FailedPrecondition(
                f"version {version} is more than {MAX_VERSION_JUMP} above the served version "
                f"{self.version}; versions advance one publication at a time"
            )

    def fits(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether tensors of these names and shapes are exactly the served model's."""
        state = self.model.state_dict()
        return set(shapes) == set(state) and all(tuple(shape) == tuple(state[n].shape) for n, shape in shapes.items())

    def replace_model(self, model, version: int, *, replace_newer: bool = False) -> int:
        """Serves `model` (a model of another architecture, same tokenizer) from `version` on; returns its tensor count.

        InvalidArgument (nothing changed) when its vocabulary differs from the tokenizer's."""
        vocab = int(model.get_input_embeddings().num_embeddings)
        if vocab != self.vocab_size:
            raise InvalidArgument(
                "path", f"the model's vocabulary has {vocab} tokens, the served tokenizer's model {self.vocab_size}"
            )
        with self.lock:
            self.check_version(version, replace_newer=replace_newer)
            self.model = model
            self.max_context = context_limit(model, self.cfg)
            self.num_parameters = sum(p.numel() for p in model.parameters())
            self._groups = alias_groups(model)
            self.version = version
        n = len(model.state_dict())
        _log.info("model_replaced", version=version, num_tensors=n, num_parameters=self.num_parameters)
        return n

    def check_tensors(self, tensors: Mapping[str, torch.Tensor], *, partial: bool) -> None:
        """Raises InvalidArgument when a name is unknown, a shape or kind of dtype differs, or a full update misses
        a tensor."""
        state = self.model.state_dict()
        for name, t in tensors.items():
            if name not in state:
                raise InvalidArgument("weights", f"unknown tensor {name!r}")
            if tuple(t.shape) != tuple(state[name].shape):
                raise InvalidArgument(
                    "weights", f"tensor {name} has shape {list(t.shape)}, expected {list(state[name].shape)}"
                )
            if t.is_floating_point() != state[name].is_floating_point():
                raise InvalidArgument("weights", f"tensor {name} has dtype {t.dtype}, expected {state[name].dtype}")
        if not partial:
            missing = [g[0] for g in self._groups if not any(n in tensors for n in g)]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise InvalidArgument("weights", f"full update misses {len(missing)} tensors: {shown}")

    def apply_weights(
        self, tensors: Mapping[str, torch.Tensor], version: int, *, partial: bool, replace_newer: bool = False
    ) -> int:
        """Validates then copies `tensors` into the model and sets `version`.

        Returns the number of tensors copied. Raises InvalidArgument (nothing
        changed) when a name is unknown, a shape differs, or a full update
        misses a tensor.
        """
        self.check_tensors(tensors, partial=partial)
        state = self.model.state_dict()
        t0 = time.perf_counter()
        with self.lock:
            self.check_version(version, replace_newer=replace_newer)
            with torch.no_grad():
                for name, t in tensors.items():
                    state[name].copy_(t.to(device=state[name].device, dtype=state[name].dtype))
            self.version = version
        log_weights_applied(version, len(tensors), partial=partial, t0=t0)
        return len(tensors)


def log_weights_applied(version: int, num_tensors: int, *, partial: bool, t0: float) -> None:
    """The weights_applied event of an update that began at time.perf_counter() `t0`."""
    _log.info(
        "weights_applied",
        version=version,
        num_tensors=num_tensors,
        partial=partial,
        apply_seconds=round(time.perf_counter() - t0, 4),
    )
