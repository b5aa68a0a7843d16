"""Typed configuration of every alignd role and of the local stack.

Each role reads one YAML file (`alignd serve ROLE --config FILE`) validated
by the pydantic model below; `--set dotted.key=value` overrides any field
(the value is parsed as YAML: `--set policy.batching.max_batch_size=64`).
Unknown keys are rejected with their dotted name. Every field is documented
in docs/configuration.md and in the comments of configs/*.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
import copy
import os
import typing

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _cidrs(v: list[str]) -> list[str]:
    import ipaddress

    for n in v:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise ValueError(f"{n!r} is not a CIDR network") from None
    return v


CIDRList = Annotated[list[str], AfterValidator(_cidrs)]  # network blocks, e.g. ["10.0.0.0/8"]


class AuthConfig(Strict):
    """Authentication and authorisation of the role's APIs (alignd.runtime.auth; docs/security.md)."""

    enabled: bool = Field(
        True,
        description="Require a credential with the right scope on every RPC but the health checks. On by default: "
        "a role refuses to start without tokens_file. false serves every caller unchecked (a role listening so on a "
        "non-loopback address logs auth_disabled_exposed at start and sets alignd_<slug>_auth_disabled_exposed 1).",
    )
    tokens_file: str | None = Field(
        None,
        description="YAML file of named tokens with their scopes ({name: {token | sha256, scopes: [...]}}; a bare "
        "`name: token` has the score scope only). `alignd up` generates one per stack (RUN_DIR/auth/tokens.yaml, "
        "mode 0600) and the chart mounts one from a Secret. Calls need 'authorization: Bearer <token>'; the file "
        "is re-read when it changes (rotation and revocation without a restart).",
    )
    public_methods: list[str] = Field(
        ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"],
        description="Full method names callable without a token: the health checks that Kubernetes probes send "
        "(the only methods allowed here).",
    )
    trusted_networks: CIDRList = Field(
        [],
        description="CIDRs whose callers may call without a token, with the score scope and nothing else (the "
        "OpenRLHF client sends no token); none by default. A caller that does send a token is checked anyway.",
    )
    metrics_requires_token: bool = Field(
        False,
        description="/metrics answers only with 'Authorization: Bearer <token>' of a token with the metrics (or "
        "admin) scope (the chart's metrics.auth). Off: /metrics is open on metrics_host, and holds no token, path "
        "or prompt.",
    )

    @field_validator("public_methods")
    @classmethod
    def _public(cls, v: list[str]) -> list[str]:
        from alignd.runtime.scopes import HEALTH_METHODS

        extra = [m for m in v if m not in HEALTH_METHODS]
        if extra:
            raise ValueError(f"only the health checks may be public, not {', '.join(extra)}")
        return v



class ServerLimitsConfig(Strict):
    """What one caller may hold of a role's gRPC server (alignd.runtime.access)."""

    max_concurrent_calls_per_client: int = Field(
        32, ge=1,
        description="Calls in flight (running or queued) per client: per token, or per peer IP for callers without "
        "one; beyond it a call answers RESOURCE_EXHAUSTED at once. Keep it below server.max_workers so that one "
        "client cannot hold every worker thread.",
    )
    max_request_bytes: dict[str, Annotated[int, Field(ge=64)]] = Field(
        {},
        description="Largest request message per method name (e.g. {Score: 16777216}), checked before it is "
        "parsed; beyond it RESOURCE_EXHAUSTED. Defaults: Score and LogProbs 16 MiB, Generate 4 MiB, TrainStep "
        "64 MiB, each UpdateWeights message 16 MiB, every other method 1 MiB; server.max_message_bytes caps all.",
    )
    stream_idle_timeout_seconds: float = Field(
        30.0, gt=0,
        description="A client stream (UpdateWeights) that sends no message for this long is ended DEADLINE_EXCEEDED, "
        "releasing what it holds (the replica's weight-update slot).",
    )
    max_health_watchers: int = Field(
        256, ge=1, description="Open grpc.health.v1 Watch streams in all; beyond it Watch answers RESOURCE_EXHAUSTED "
        "(Check still answers: probes use Check)."
    )
    max_health_watchers_per_peer: int = Field(
        64, ge=1, description="Open Watch streams per peer IP (they need no token, so the peer is the client)."
    )


class TLSConfig(Strict):
    """TLS of the role's gRPC API (and of the reward role's HTTP API), from PEM files (a mounted Secret)."""

    cert_file: str | None = Field(
        None, description="PEM certificate chain the server presents. null (with key_file): plaintext, no TLS."
    )
    key_file: str | None = Field(None, description="PEM private key of cert_file.")
    client_ca_file: str | None = Field(
        None,
        description="PEM CA bundle of client certificates: set, the server requires and verifies a client "
        "certificate (mutual TLS): a gRPC caller without one is refused at the handshake; over HTTPS (the reward "
        "role) it gets 403 for everything but GET /health, which probes need. A certificate the CA did not sign "
        "fails the handshake on both.",
    )

    @field_validator("cert_file", "key_file", "client_ca_file")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None else os.path.expanduser(os.path.expandvars(v))

    @model_validator(mode="after")
    def _pairs(self) -> "TLSConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both (TLS) or neither (plaintext)")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mutual TLS) needs cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class FaultInjectionConfig(Strict):
    """Faults this role injects into its own RPCs, for chaos drills (e.g. one slow policy replica, to check that
    the coordinator hedges it). Off by default; never set it on a production replica by accident: every injected
    fault is logged (`fault_injected`) and counted in alignd_rpc_faults_injected_total."""

    delay_seconds: float = Field(0.0, ge=0, description="Added before each matching RPC is served, in seconds; 0 = off.")
    methods: list[str] = Field(
        [], description='RPC method names to delay, e.g. ["Generate"]; empty = every RPC of the role (health checks never).'
    )


class ServerConfig(Strict):
    """gRPC and metrics endpoints of one role."""

    host: str = Field("127.0.0.1", description='Interface the gRPC server binds; "0.0.0.0" in containers.')
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 = an ephemeral port (see the endpoint file / stack.json).")
    metrics_host: str = Field("127.0.0.1", description="Interface of the Prometheus /metrics HTTP endpoint.")
    metrics_port: int = Field(0, ge=-1, le=65535, description="/metrics port; 0 = ephemeral, -1 = disabled.")
    health_port: int = Field(
        -1, ge=-1, le=65535,
        description="A second port, plaintext, serving grpc.health.v1 only: for Kubernetes' gRPC probes, which speak "
        "no TLS, when server.tls is on (the chart's tls). -1 = none; 0 = ephemeral.",
    )
    metrics_tls: bool = Field(
        False,
        description="Serve /metrics over HTTPS with server.tls's certificate (requiring a client certificate when "
        "tls.client_ca_file is set). Off: plain HTTP.",
    )
    max_workers: int = Field(
        128, ge=1,
        description="Threads serving RPCs; each waiting call holds one, so keep it above batching.max_batch_size "
        "(the model itself runs on one batcher thread) and above limits.max_concurrent_calls_per_client. Health "
        "checks and refused calls have threads of their own.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024, ge=1024,
        description="Largest gRPC message the transport accepts or sends, in bytes; limits.max_request_bytes sets "
        "smaller limits per method.",
    )
    grace_seconds: float = Field(10.0, ge=0, description="On SIGTERM, in-flight RPCs get this long to finish, in seconds.")
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="Tokens and scopes (on by default: docs/security.md)."
    )
    limits: ServerLimitsConfig = Field(
        default_factory=ServerLimitsConfig, description="Per-client concurrency, request sizes, idle streams."
    )
    tls: TLSConfig = Field(default_factory=TLSConfig, description="TLS / mutual TLS from certificate files (off by default).")
    fault_injection: FaultInjectionConfig = Field(
        default_factory=FaultInjectionConfig, description="Injected delays for chaos drills (off by default)."
    )

    @model_validator(mode="after")
    def _metrics_tls_needs_tls(self) -> "ServerConfig":
        if self.metrics_tls and not self.tls.enabled:
            raise ValueError("metrics_tls needs tls.cert_file and tls.key_file")
        return self


class RoleClientConfig(Strict):
    """The credentials a role presents to the roles it calls (its token; TLS / mutual TLS)."""

    tokens_file: str | None = Field(
        None,
        description="File with the bearer token to send: the token alone, or with token_name a tokens YAML "
        "({name: token} or {name: {token, scopes}}: the local stack's generated file). Re-read when it changes. "
        "null: no token (only for roles with server.auth.enabled: false).",
    )
    token_name: str | None = Field(None, description="Which token of the tokens_file YAML to send.")
    ca_file: str | None = Field(
        None, description="PEM CA bundle that signed the server's certificate; set: connect with TLS. null: plaintext."
    )
    cert_file: str | None = Field(None, description="PEM client certificate, for a server that requires mutual TLS.")
    key_file: str | None = Field(None, description="PEM private key of cert_file.")
    server_name: str | None = Field(
        None, description="Name to verify in the server's certificate instead of the address's host (TLS only)."
    )

    @field_validator("tokens_file", "ca_file", "cert_file", "key_file")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return None if v is None else os.path.expanduser(os.path.expandvars(v))

    @model_validator(mode="after")
    def _pairs(self) -> "RoleClientConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("cert_file (mutual TLS) needs ca_file (TLS)")
        if self.token_name is not None and self.tokens_file is None:
            raise ValueError("token_name needs tokens_file")
        return self


class ModelConfig(Strict):
    """A Hugging Face model directory loaded with `from_pretrained`."""

    path: str = Field(description='save_pretrained directory (config.json, weights, tokenizer); "~" and $VARS are expanded.')
    name: str | None = Field(None, description="Name reported by GetInfo; default: the directory name.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight and compute dtype. Use float32 on CPU (bf16 matmuls are ~100x slower there)."
    )
    device: str = Field("cpu", description='Torch device, e.g. "cpu" or "cuda:0".')
    max_context_tokens: int | None = Field(
        None, ge=2, description="Longest prompt + response in tokens; default: the model's max_position_embeddings."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the directory (transformers trust_remote_code).")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(os.path.expandvars(v))


class BatchingConfig(Strict):
    """Dynamic batching of concurrent requests."""

    max_batch_size: int = Field(32, ge=1, description="Sequences per forward batch; larger requests run in chunks of this size.")
    max_wait_ms: float = Field(
        5.0, ge=0, description="How long the first request of a batch that is not full waits for others, in milliseconds."
    )
    max_queue: int = Field(256, ge=1, description="Requests allowed to wait; beyond this, calls answer RESOURCE_EXHAUSTED.")


# Each role's batching section is its own model with the role's defaults, so that a partial section
# (`batching: {max_queue: 512}`) keeps the role's other defaults instead of BatchingConfig's.
class PolicyBatchingConfig(BatchingConfig):
    """Dynamic batching of Generate calls."""

    max_wait_ms: float = Field(
        20.0, ge=0,
        description="How long the first request of a batch that is not full waits for others, in milliseconds. "
        "20 lets a burst of concurrent calls form one batch (bench/README.md: 11x over sequential generate vs 7.6x at 5 ms).",
    )


class ReferenceBatchingConfig(BatchingConfig):
    """Dynamic batching of LogProbs calls."""

    max_wait_ms: float = Field(
        0.0, ge=0, description="How long a lone request waits for company, in milliseconds; 0: calls that arrive "
        "while a batch runs join the next one."
    )


class RewardBatchingConfig(BatchingConfig):
    """Dynamic batching of Score calls, bounded in sequences and in tokens."""

    max_wait_ms: float = Field(
        0.0, ge=0, description="How long a lone request waits for company, in milliseconds; 0: calls that arrive "
        "while a batch runs join the next one, and a lone call is not delayed (bench/README.md)."
    )

    max_batch_tokens: int | None = Field(
        16384, ge=1,
        description="Token budget of one batch: the batcher stops collecting requests once their prompt + response "
        "tokens would exceed it, and the engine runs a batch as forward passes of at most max_batch_size rows and "
        "this many padded tokens (rows x longest row; rows are sorted by length first). null: rows only.",
    )


class RewardHTTPConfig(Strict):
    """The reward role's HTTP API: OpenRLHF's remote reward model protocol (POST /get_reward), on uvicorn."""

    port: int = Field(0, ge=-1, le=65535, description="HTTP port; 0 = an ephemeral port (stack.json: http_url), -1 = disabled.")
    host: str | None = Field(None, description="Interface the HTTP server binds; default: server.host.")
    max_connections: int = Field(
        1024, ge=1,
        description="Connections held at once. At the cap a new connection evicts the one that has waited longest "
        "for its request headers (idle keep-alive or trickling); it is refused 503 only when every connection is "
        "inside a request. Connections cost a few KB each (one event loop), not a thread.",
    )
    max_connections_per_client: int = Field(
        64, ge=1, description="Connections from one IP address at once; beyond, 503 and closed at once."
    )
    connection_cap_exempt_networks: CIDRList = Field(
        [], description="CIDRs not held to max_connections_per_client (an ingress or load balancer that carries "
        "many clients' connections from one address)."
    )
    header_timeout_seconds: float = Field(
        10.0, gt=0,
        description="From a connection's accept (or the end of the previous answer) to the end of the request's "
        "headers, in seconds, however the bytes trickle in; then 408 and closed.",
    )
    body_timeout_seconds: float = Field(30.0, gt=0, description="Time to receive a request's body, in seconds; then 408.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024,
        description="Largest request body, in bytes: refused 413 from its Content-Length before it is read (counted "
        "while read for a chunked body).",
    )
    max_json_depth: int = Field(64, ge=2, description="Deepest nesting of arrays and objects in a body, checked before parsing.")
    max_concurrent_requests: int = Field(
        64, ge=1, description="Requests parsed and scored at once (worker threads); /health never waits for them."
    )
    timeout_seconds: float = Field(
        120.0, gt=0,
        description="Deadline of one /get_reward request (queue + scoring), in seconds; a caller may ask for less "
        "with the X-Request-Timeout header. Work whose deadline passed is dropped, answered 504.",
    )
    idle_timeout_seconds: float = Field(
        30.0, ge=1, description="A keep-alive connection idle this long after an answer is closed, in seconds."
    )


class RewardLimitsConfig(Strict):
    """Request limits of the reward APIs (gRPC Score and HTTP /get_reward alike)."""

    max_items: int = Field(1024, ge=1, description="Items (gRPC) or queries (HTTP) in one request; more: INVALID_ARGUMENT / 400.")
    max_text_bytes: int = Field(
        262144, ge=1, description="UTF-8 bytes of one prompt or response text (a query over HTTP); more: INVALID_ARGUMENT / 400."
    )
    too_long: Literal["reject", "truncate_left"] = Field(
        "reject",
        description="Inputs whose prompt + response exceed the model's context: reject (INVALID_ARGUMENT / 400 naming "
        "the item) or truncate_left (drop the oldest tokens, prompt first, keeping the end of the response that "
        "the score reads).",
    )


class PathsConfig(Strict):
    """Where paths named by requests may lead (alignd.runtime.paths; docs/security.md)."""

    roots: list[str] = Field(
        [],
        description="Directories that paths in requests (run directories, job outputs and data, weights to load, "
        "texts to evaluate) must lie under, after symlinks are resolved; anything else is INVALID_ARGUMENT naming "
        "the field. The role's run directory (--run-dir) is always one. The local stack adds its run directory, the "
        "directory it was started from, $ALIGND_CACHE and the directories of the job file's data; the chart adds "
        "the shared volume.",
    )

    @field_validator("roots")
    @classmethod
    def _expand(cls, v: list[str]) -> list[str]:
        return [os.path.expanduser(os.path.expandvars(r)) for r in v]


class RoleConfig(Strict):
    server: ServerConfig = Field(ServerConfig(), description="gRPC and metrics endpoints.")
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Where paths in requests may lead.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="structlog level; prompts and responses are only logged at debug."
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default (all cores).")


class PolicyConfig(RoleConfig):
    """policy: samples responses (alignd.v1.PolicyService + ModelService)."""

    model: ModelConfig = Field(description="The policy's causal LM.")
    batching: PolicyBatchingConfig = Field(
        default_factory=PolicyBatchingConfig,
        description="Dynamic batching of Generate calls. The 20 ms default wait lets a burst of concurrent calls "
        "form one batch (bench/README.md: 11x over sequential generate vs 7.6x at 5 ms).",
    )


class RewardFunctionConfig(Strict):
    """A programmatic reward served instead of the model's head (rule-based rewards, tests, gold judges)."""

    name: str = Field(description='A function of alignd.rewards ("token_fraction") or "package.module:function".')
    args: dict[str, Any] = Field({}, description="Keyword arguments passed to the function.")


class RewardConfig(RoleConfig):
    """reward: scores responses (alignd.v1.RewardService + ModelService)."""

    model: ModelConfig = Field(
        description="The reward model: a *ForSequenceClassification checkpoint with one label (with `function`: "
        "any model directory; only its tokenizer is used)."
    )
    function: RewardFunctionConfig | None = Field(
        None, description="Score with this function of (prompt ids, response ids, tokenizer) instead of the model."
    )
    batching: RewardBatchingConfig = Field(
        default_factory=RewardBatchingConfig,
        description="Dynamic batching of Score calls. No wait by default: calls that arrive while a batch runs "
        "join the next one, and a lone call is not delayed (bench/README.md).",
    )
    limits: RewardLimitsConfig = Field(default_factory=RewardLimitsConfig, description="Request limits and the context policy.")
    http: RewardHTTPConfig = Field(
        default_factory=RewardHTTPConfig,
        description="HTTP API (OpenRLHF's POST /get_reward), with the same authentication, TLS, limits and batcher as gRPC.",
    )
    allow_new_head: bool = Field(
        False,
        description="Serve a directory without a trained scalar head (randomly initialised). Off: a random reward is a silent bug.",
    )


class ReferenceConfig(RoleConfig):
    """reference: log-probs of the frozen SFT model (alignd.v1.ReferenceService + ModelService)."""

    model: ModelConfig = Field(description="The frozen reference (SFT) causal LM.")
    batching: ReferenceBatchingConfig = Field(
        default_factory=ReferenceBatchingConfig,
        description="Dynamic batching of LogProbs calls (no wait by default, as for reward).",
    )


class PPOConfig(Strict):
    """PPO hyper-parameters. Defaults are InstructGPT's (Ouyang et al. 2022, appendix C.4)."""

    kl_coef: float = Field(0.02, ge=0, description="beta: per-token KL penalty coefficient (fixed unless adaptive_kl_target is set).")
    adaptive_kl_target: float | None = Field(
        None, gt=0, description="Target KL per sequence for the adaptive controller of Ziegler et al. 2019; null = fixed kl_coef."
    )
    adaptive_kl_horizon: int = Field(10000, ge=1, description="Horizon (in samples) of the adaptive KL controller.")
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = Field("k1", description="Per-token KL estimator in the reward penalty.")
    score_position: Literal["last", "eos_plus_one"] = Field(
        "last", description='Where the RM score is added: the last response token, or one past it when it fits (TRL).'
    )
    clip: float = Field(0.2, gt=0, description="PPO ratio clip epsilon.")
    value_clip: float = Field(0.2, gt=0, description="Clip range of the value prediction around the old value.")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_unbiased: bool = Field(True, description="Whitening of advantages uses the unbiased variance (TRL) or the biased one.")
    epochs: int = Field(1, ge=1, description="PPO epochs over each rollout batch.")
    minibatches: int = Field(8, ge=1, description="Minibatches per epoch (the paper: batch 512 in 8 minibatches of 64).")
    max_grad_norm: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts; logits are divided by it.")
    ptx_coef: float = Field(0.0, ge=0, description="gamma_ptx of PPO-ptx (the paper: 27.8); 0 disables the pretraining loss.")
    ptx_data: str | None = Field(None, description="Text file (one document per line) for the PPO-ptx pretraining loss.")
    ptx_batch_size: int = Field(4, ge=1, description="Pretraining sequences per minibatch when PPO-ptx is on.")
    ptx_max_tokens: int = Field(128, ge=2, description="Tokens per pretraining sequence.")
    old_logprobs: Literal["auto", "recompute"] = Field(
        "auto",
        description=(
            "The PPO old log-probs. auto: taken from the rollouts when the coordinator marks them exact (sampled "
            "without top-k/top-p truncation at this temperature, policy and learner in float32) and every "
            "sample comes from the learner's current weights, as TRL does; this saves one policy forward per step "
            "when the value model is separate. Otherwise, and always with recompute: one no-grad forward of the "
            "current weights."
        ),
    )
    off_policy: Literal["behaviour", "decoupled"] = Field(
        "behaviour",
        description=(
            "Samples of older weights than the learner's (async rollouts, run.async_rollouts). behaviour: the PPO "
            "ratio is pi / pi_behaviour, with the log-probs of the policy that sampled (the rollouts'), so the "
            "ratio is the importance weight and the clip bounds the step from the sampling policy; no extra forward. "
            "decoupled (Hilton et al. 2022): the ratio is clipped around the current weights' recomputed log-probs, "
            "and each token's clipped term is weighted by pi_current / pi_behaviour, truncated at "
            "behaviour_weight_cap; one more forward per step. behaviour needs exact rollouts (untruncated sampling "
            "at this temperature, fp32); otherwise stale samples are corrected as with decoupled."
        ),
    )
    behaviour_weight_cap: float | None = Field(
        2.0, gt=0, description="off_policy: decoupled: truncation of the importance weights; null: not truncated."
    )


class OptimizerConfig(Strict):
    """Adam for policy and value model (InstructGPT: betas 0.9, 0.95; constant LR after warm-up)."""

    lr: float = Field(1e-5, gt=0, description="Peak learning rate of the policy.")
    value_lr: float | None = Field(None, gt=0, description="Peak learning rate of the value model; default: lr.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up from warmup_start_factor x lr to lr, in optimizer steps.")
    warmup_start_factor: float = Field(0.1, gt=0, le=1, description="LR at step 0 as a fraction of peak (the paper: a tenth).")
    fused: bool | None = Field(
        None,
        description=(
            "torch's fused AdamW kernel (one pass over each parameter; about 5x faster on CPU than the per-tensor "
            "loop for a 135M model). null: fused where torch has it for the device, as TRL's default optimizer."
        ),
    )


class SFTConfig(Strict):
    """Supervised fine-tuning (InstructGPT appendix C.1: cosine LR to 10%, residual dropout 0.2)."""

    epochs: int = Field(2, ge=1, description="Passes over the demonstrations (the paper: 16).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Demonstrations per optimizer step.")
    max_tokens: int = Field(512, ge=4, description="Prompt + completion tokens per example (prompt cut from the left).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    residual_dropout: float = Field(0.2, ge=0, lt=1, description="Dropout during SFT (models without dropout modules ignore it).")
    select: Literal["val_loss", "last"] = Field("val_loss", description="Which epoch's weights are kept.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share (split by prompt) when no validation file is given.")
    seed: int = Field(0, description="Shuffling and split seed.")
    skip_bad_lines: bool = Field(
        False, description="Drop malformed data lines (counted and reported with file:line) instead of refusing the job."
    )


class RMTrainConfig(Strict):
    """Reward-model training (InstructGPT appendix C.2: one epoch, cosine LR to 10%)."""

    epochs: int = Field(1, ge=1, description="Passes over the comparisons (the paper: 1; more overfits).")
    lr: float = Field(9e-6, gt=0, description="Peak learning rate (the paper's 6B RM: 9e-6).")
    batch_size: int = Field(8, ge=1, description="Prompts per step, each with all C(K,2) pairs of its ranking.")
    max_tokens: int = Field(512, ge=4, description="Prompt + completion tokens per sequence (prompt cut from the left).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps before the cosine decay.")
    max_k: int = Field(9, ge=2, description="Largest K accepted per ranking.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share (split by prompt) when no validation file is given.")
    seed: int = Field(0, description="Shuffling and split seed.")
    skip_bad_lines: bool = Field(
        False, description="Drop malformed data lines (counted and reported with file:line) instead of refusing the job."
    )
    pooling: Literal["last", "mean"] = Field(
        "last",
        description="What the scalar head reads: the last token of prompt + response (Hugging Face's sequence "
        "classifiers, TRL), or the mean over the response tokens (a preference spread over the words of a response, "
        "such as sentiment). Recorded in the RM's config.json; the reward role scores the same way.",
    )
    layers: int | None = Field(
        None, ge=1,
        description="Keep only the first N transformer blocks of the initial model: an RM smaller (and faster to "
        "train and serve) than the policy. null keeps them all.",
    )
    train: Literal["full", "head"] = Field(
        "full",
        description="full: fine-tune the whole model (the paper); head: freeze the backbone and fit the linear head "
        "alone by L-BFGS on features computed once (epochs, lr, batch_size and warmup_steps then unused), "
        "regularised by head_l2: for a few hundred noisy comparisons, where fine-tuning overfits.",
    )
    head_l2: float = Field(
        0.3, ge=0, description="train: head: L2 penalty on the head's weights over standardised features."
    )
    score_scale: Literal["none", "unit_std"] = Field(
        "none",
        description="none: scores as trained (the paper: only a bias, so that demonstrations average 0); unit_std: "
        "the head is also divided by the standard deviation of the RM's scores over its training completions (the "
        "policy's samples in a pipeline), as Ziegler et al. 2019 normalise the reward, so that ppo.kl_coef weighs "
        "the KL against a reward of the same spread whatever scale a fit lands on.",
    )


class EngineConfig(Strict):
    """How the learner runs its optimizer: plain torch (CPU default) or DeepSpeed ZeRO."""

    kind: Literal["torch", "deepspeed"] = Field("torch", description="Training engine.")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage (deepspeed engine only).")
    bf16: bool = Field(False, description="bf16 mixed precision (deepspeed engine on GPUs).")
    collective_timeout_seconds: float = Field(
        1800.0, ge=5,
        description="torch.distributed timeout of every collective, in seconds (deepspeed engine). Under torchrun a rank "
        "that dies or hangs makes the others' next collective fail after at most this long, which ends the whole job "
        "(Kubernetes restarts it from the latest checkpoint); ranks > 0 wait at most this long for rank 0's next "
        "command (rank 0 sends a heartbeat every min(10 s, a quarter of it) when idle). Keep it above the longest "
        "checkpoint write.",
    )


class LearnerConfig(RoleConfig):
    """learner: PPO / SFT / RM training (alignd.v1.LearnerService + ModelService)."""

    model: ModelConfig = Field(description="The policy to train (its initial weights).")
    value_model: ModelConfig | None = Field(
        None,
        description="Initial weights of the value model (a one-label *ForSequenceClassification, e.g. the reward model's "
        "directory, as in the paper). Required unless value_head_on_policy.",
    )
    value_head_on_policy: bool = Field(False, description="Use a value head on the policy's backbone instead of a separate value model.")
    ppo: PPOConfig = Field(PPOConfig(), description="PPO hyper-parameters.")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="Optimizer and LR schedule.")
    engine: EngineConfig = Field(EngineConfig(), description="Training engine.")
    ema_decay: float | None = Field(0.992, gt=0, lt=1, description="EMA of the policy weights (the paper: 0.992); null disables.")
    seed: int = Field(0, description="Seed of minibatch shuffling and initialisation.")
    checkpoint_dir: str | None = Field(
        None, description="Where checkpoints go; default: RUN_DIR/learner/checkpoints. The learner resumes from the latest one."
    )
    checkpoint_every_steps: int = Field(
        1, ge=0,
        description="Checkpoint after every N steps; 0 = only on SaveCheckpoint. Keep 1 for runs that must survive a "
        "learner restart: with N > 1 a restarted learner is behind the coordinator's step and the run fails.",
    )
    checkpoint_keep: int = Field(2, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    policy_addresses: list[str] = Field(
        [],
        description="host:port of every policy replica that receives new weights (a headless Service name stands for "
        "every address it resolves to). PushWeights sends to these and nowhere else.",
    )
    client: RoleClientConfig = Field(
        default_factory=RoleClientConfig,
        description="Credentials the learner presents to the policy replicas (a token with the weights scope; TLS). "
        "The local stack fills it in.",
    )
    push_chunk_bytes: int = Field(
        1 << 20, ge=1024, le=16 << 20,
        description="Chunk size of the weight stream, in bytes (at most the replicas' request limit of an "
        "UpdateWeights message, server.limits.max_request_bytes: 16 MiB by default).",
    )
    weight_sync: Literal["auto", "stream", "filesystem"] = Field(
        "auto",
        description='How new policy weights reach the replicas: "stream" (ModelService.UpdateWeights over gRPC), '
        '"filesystem" (written once to weight_sync_dir, loaded by each replica with LoadWeights), or "auto": '
        "filesystem through shared memory (a directory of this process under /dev/shm, removed when it exits) when "
        "every replica is on loopback (the local stack) and /dev/shm has room for three copies of the policy, "
        "stream otherwise (about 3x faster for SmolLM2-135M on 2 cores: bench/NOTES.md).",
    )
    weight_sync_dir: str | None = Field(
        None, description="Shared directory for weight_sync: filesystem; default: next to the checkpoints."
    )


_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


class JobResourcesConfig(Strict):
    """CPU, memory and GPUs of one job's pod (requests; memory and GPUs are also limits)."""

    cpu: str | None = Field("2", pattern=_QUANTITY, description='CPU request (a Kubernetes quantity: "2", "500m"); null = none.')
    memory: str | None = Field(
        "8Gi", pattern=_QUANTITY, description='Memory request and limit (a Kubernetes quantity: "8Gi"); null = none.'
    )
    gpu: int = Field(
        0, ge=0,
        description="nvidia.com/gpu limit. The training jobs run on CPU today (the learner's supervised trainer has no "
        "device option), so 0 by default; GPU nodes usually also need a toleration (see tolerations).",
    )

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_to_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class KubernetesLauncherConfig(Strict):
    """How the coordinator runs a job as a Kubernetes batch/v1 Job (launcher.kind: kubernetes)."""

    namespace: str | None = Field(
        None,
        description="Namespace of the Jobs; default: the coordinator pod's own namespace (from its service-account "
        'token mount), else "default". The coordinator\'s Role (charts/alignd/templates/rbac.yaml) covers its own namespace only.',
    )
    kubeconfig: str | None = Field(
        None, description="A kubeconfig file to reach the API with; default: the in-cluster service account."
    )
    image: str | None = Field(
        None, description="Image of the job pods: one with the model dependencies (the alignd-gpu image). Required."
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="imagePullPolicy of the job container.")
    image_pull_secrets: list[str] = Field([], description="Names of Secrets to pull the image with.")
    service_account: str | None = Field(
        None, description="serviceAccountName of the job pods (no API token is mounted either way); default: the namespace's default."
    )
    pvc_claim: str | None = Field(
        None,
        description="PersistentVolumeClaim of the shared run volume (the chart's: <release>-alignd-data), mounted in the job "
        "pod at run_mount_path. Required: the job reads its request and writes its result there.",
    )
    run_mount_path: str = Field(
        "/var/lib/alignd",
        description="Where the job pod mounts pvc_claim: the coordinator's mount path, so every path of a request "
        "(under runs_dir) means the same file in the job.",
    )
    rm_resources: JobResourcesConfig = Field(JobResourcesConfig(), description="Resources of a reward-model training job.")
    ttl_seconds_after_finished: int = Field(
        600, ge=0, description="ttlSecondsAfterFinished: the cluster deletes a finished Job after this long if the coordinator could not."
    )
    node_selector: dict[str, str] = Field({}, description="nodeSelector of the job pods.")
    tolerations: list[dict[str, Any]] = Field(
        [], description='Tolerations of the job pods (Kubernetes objects), e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}].'
    )
    labels: dict[str, str] = Field({}, description="Extra labels of the Job and its pods (e.g. app.kubernetes.io/instance).")
    env: dict[str, str] = Field({}, description="Extra environment variables of the job container.")


class LauncherConfig(Strict):
    """How the coordinator runs one-off jobs such as reward-model training (services/coordinator/launchers.py)."""

    kind: Literal["local", "kubernetes"] = Field(
        "local",
        description='"local": `python -m alignd.cli job ...` as a child process of the coordinator; "kubernetes": a batch/v1 '
        "Job in the cluster (see kubernetes).",
    )
    kubernetes: KubernetesLauncherConfig = Field(KubernetesLauncherConfig(), description="The Kubernetes Job launcher.")

    @model_validator(mode="after")
    def _kubernetes_needs_image_and_volume(self) -> "LauncherConfig":
        if self.kind == "kubernetes":
            missing = [k for k in ("image", "pvc_claim") if not getattr(self.kubernetes, k)]
            if missing:
                raise ValueError(f"{' and '.join('kubernetes.' + k for k in missing)} required when kind is kubernetes")
        return self


RETRY_PHASES = ("generate", "score", "reference", "train", "sync_weights", "evaluate", "sft", "rm")


class HedgingConfig(Strict):
    """What the coordinator does about a slow or failed policy replica (with two replicas or more)."""

    enabled: bool = Field(True, description="Hedge slow shards (a failed replica's shard is always sent elsewhere).")
    delay_factor: float = Field(
        2.0, ge=1.0,
        description="A rollout shard still running this many times longer than the step's fastest finished shard is "
        "sent again to a replica that is done; the first answer is used, the other call cancelled.",
    )
    min_delay_seconds: float = Field(1.0, ge=0, description="Never hedge a shard younger than this, in seconds.")
    out_of_rotation_steps: int = Field(
        5, ge=1,
        description="A replica that was slow (its shard hedged and the hedge won) or unavailable gets no shard of "
        "its own for this many steps; then it is checked, re-synced to the current weights, and used again.",
    )


class JudgePluginConfig(Strict):
    """A judge of your own, registered under a name in the coordinator's configuration (never named by a request)."""

    function: str = Field(
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description='"package.module:function" of a function (prompt, completion, **args) -> float, importable by '
        "the coordinator.",
    )
    args: dict[str, Any] = Field({}, description="Keyword arguments bound to it (a run's judge args are added).")


class CoordinatorConfig(RoleConfig):
    """coordinator: runs the RLHF loop (alignd.v1.CoordinatorService). Imports no torch."""

    policy_addresses: list[str] = Field([], description="host:port of every policy replica (requests are spread over all).")
    reward_addresses: list[str] = Field([], description="host:port of every reward replica.")
    client: RoleClientConfig = Field(
        default_factory=RoleClientConfig,
        description="Credentials the coordinator presents to every role it calls (a token with the scopes "
        "generate, score, logprobs, train and weights; TLS). The local stack fills it in.",
    )
    reward_client: RoleClientConfig = Field(
        default_factory=RoleClientConfig,
        description="Other credentials for the reward replicas only (e.g. a reward service run by another team); "
        "default: client.",
    )
    reference_addresses: list[str] = Field([], description="host:port of every reference replica.")
    learner_address: str | None = Field(None, description="host:port of the learner.")
    runs_dir: str | None = Field(None, description="Where run state lives (RUNS_DIR/<run_id>/); default: RUN_DIR/runs.")
    rpc_timeout_seconds: float = Field(600.0, gt=0, description="Deadline of each call to another role, in seconds.")
    recovery_timeout_seconds: float = Field(
        900.0, gt=0, description="How long a role may be unavailable (restarting) before the run fails, in seconds."
    )
    retry_budget_seconds: dict[Literal[RETRY_PHASES], Annotated[float, Field(gt=0)]] = Field(
        {},
        description="Per phase, how long a call may keep retrying an unavailable role (with jittered backoff) before "
        "the run fails, in seconds; phases: " + ", ".join(RETRY_PHASES) + ". A phase not listed uses "
        "recovery_timeout_seconds.",
    )
    hedging: HedgingConfig = Field(
        default_factory=HedgingConfig, description="Slow and failed policy replicas: hedging and rotation."
    )
    launcher: LauncherConfig = Field(
        LauncherConfig(), description="How jobs that run outside the roles (reward-model training) are started."
    )
    judges: dict[str, JudgePluginConfig] = Field(
        {},
        description="Judges a run may name besides the built-in ones of alignd.judges (char_fraction, "
        "distinct_char_fraction, vader, textblob, afinn): {name: {function: \"package.module:function\", args}}. A run "
        "request names a judge; it never names code.",
    )

    @field_validator("judges")
    @classmethod
    def _judge_names(cls, v: dict) -> dict:
        from alignd.judges import BUILTIN

        clash = sorted(set(v) & set(BUILTIN))
        if clash:
            raise ValueError(f"{', '.join(clash)}: already built-in judges; register yours under other names")
        return v

    def credentials_for(self, role: str) -> RoleClientConfig:
        """What the coordinator presents to `role`: reward_client for the reward replicas when it is set, else client."""
        if role == "reward" and self.reward_client != RoleClientConfig():
            return self.reward_client
        return self.client


class SamplingConfig(Strict):
    """Rollout sampling (InstructGPT: temperature 1, no truncation)."""

    temperature: float = Field(1.0, ge=0, description="Softmax temperature; must equal the learner's ppo.temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k truncation; 0 = off.")
    max_new_tokens: int = Field(32, ge=1, description="Response length limit, in tokens.")
    stop_token_ids: list[int] = Field([], description="Extra stop tokens (EOS always stops unless ignore_eos).")
    ignore_eos: bool = Field(False, description="Keep sampling past EOS.")


class PromptsConfig(Strict):
    """Where prompts come from: a JSONL file with a text field, or a plain text file (one prompt per line)."""

    path: str = Field(description='JSONL ({"prompt": ...} per line) or .txt (one prompt per line); "~" and $VARS expanded.')
    field: str = Field("prompt", description="JSONL field holding the prompt text.")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(os.path.expandvars(v))


class PPORunConfig(Strict):
    """A PPO run, as sent to CoordinatorService.StartRun (config_yaml)."""

    steps: int = Field(20, ge=1, description="PPO iterations.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per iteration (the paper: 512 episodes per batch).")
    samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt.")
    prompts: PromptsConfig = Field(description="The prompt set (sampled without replacement, reshuffled each epoch).")
    sampling: SamplingConfig = Field(SamplingConfig(), description="Rollout sampling.")
    seed: int = Field(0, description="Seed of prompt order and sampling.")
    async_rollouts: bool = Field(
        False,
        description=(
            "Off (default, the paper): each step samples with the weights of the step before. On: the rollouts of "
            "the next steps are generated, scored and given reference log-probs while the learner trains, with "
            "weights at most max_staleness versions old; the learner corrects for the older policy "
            "(ppo.off_policy). Faster where roles have their own hardware; the staleness used is recorded "
            "per step."
        ),
    )
    max_staleness: int = Field(
        1, ge=1, le=8, description="Async rollouts: how many policy versions a step's samples may lag the weights trained on them."
    )
    stage_weights: bool = Field(
        True,
        description=(
            "Async rollouts: when the learner's new weights are ready while the policy still generates the next "
            "step's samples, send them to the replicas' staging buffers at once (received and checked, not served); "
            "after the generation the push only applies them. Each replica holds one more copy of the policy in "
            "host memory from the staging to the end of that generation (until its next weight update, if the run "
            "stops in between); off: the whole transfer waits for the generation. Turned off for the rest of a run "
            "when the learner or a replica cannot stage (an older alignd)."
        ),
    )
    rollout_micro_batches: int = Field(
        1, ge=1, le=64,
        description=(
            "Split each step's prompts into this many micro-batches, generated one after another; each one is "
            "scored and given reference log-probs as soon as it is generated, while the next one generates. "
            "Hides scoring behind generation where the roles have their own accelerators, at the cost of "
            "smaller generation batches; 1 (default): the whole step in one batch."
        ),
    )

    @model_validator(mode="after")
    def _micro_batches_fit(self) -> "PPORunConfig":
        if self.rollout_micro_batches > self.prompts_per_step:
            raise ValueError(
                f"rollout_micro_batches ({self.rollout_micro_batches}) exceeds prompts_per_step ({self.prompts_per_step})"
            )
        return self


class JudgeConfig(Strict):
    """A text judge of a run: a function of (prompt, completion) -> score, by name."""

    name: str = Field(
        description='A built-in judge of alignd.judges (e.g. "char_fraction") or one registered in the coordinator\'s '
        "configuration (coordinator.judges); a run names judges, never code."
    )
    args: dict[str, Any] = Field({}, description="Keyword arguments passed to the judge.")


class LabelingConfig(Strict):
    """How comparisons are collected for reward-model training."""

    prompts_per_round: int = Field(32, ge=2, description="Prompts sampled per labeling round.")
    k: int = Field(4, ge=2, le=9, description="Completions per prompt to rank (the paper: 4..9).")
    target_agreement: float = Field(
        0.73, gt=0.5, lt=1, description="Pairwise agreement of two simulated labelers (the paper's labelers: ~73%)."
    )
    labelers: Literal["simulated", "external"] = Field(
        "simulated",
        description=(
            "Who ranks: two simulated labelers (the gold scorer plus Bradley-Terry noise, calibrated to target_agreement; "
            "both rank every task and both rankings train the RM, as every labeler's do in the paper), or external "
            "labelers through the coordinator's LeaseComparisonTasks "
            "and SubmitRanking RPCs (the round waits until every task has labels_per_task rankings)."
        ),
    )
    labels_per_task: int = Field(
        1, ge=1, le=16, description="External labelers: rankings needed per task (2 or more measures their agreement)."
    )


class RMRetrainConfig(Strict):
    """RM retraining rounds during PPO (the paper's "repeat steps 2 and 3")."""

    every_steps: int = Field(
        0, ge=0, description="A labeling round on fresh samples of the current policy every N PPO steps; 0 = never."
    )
    prompts_per_round: int | None = Field(
        None, ge=2, description="Prompts per retraining round; default: labeling.prompts_per_round."
    )


class EvaluationConfig(Strict):
    """Held-out evaluation of the final policy against the SFT policy."""

    prompts: PromptsConfig = Field(description="Held-out prompts.")
    max_prompts: int = Field(64, ge=1, description="At most this many held-out prompts.")
    samples_per_prompt: int = Field(1, ge=1, description="Responses per prompt and policy.")
    sampling: SamplingConfig = Field(SamplingConfig(), description="Sampling of the evaluation responses.")
    heldout_text: str | None = Field(
        None,
        description="Plain text (one document per line, read by the learner) for the alignment tax: the policy's LM loss "
        "on it after PPO minus before (with or without PPO-ptx, as the learner is configured). None: not measured.",
    )
    heldout_max_tokens: int = Field(128, ge=2, description="Tokens per block of the held-out text.")


class PipelineConfig(Strict):
    """The whole InstructGPT pipeline, as sent to CoordinatorService.StartRun (`kind: pipeline`)."""

    kind: Literal["pipeline"] = Field("pipeline", description="Marks a pipeline run (PPO-only runs have no kind).")
    demonstrations: str = Field(description='JSONL of {"prompt", "completion"} for SFT (read by the learner).')
    sft: SFTConfig = Field(SFTConfig(), description="Supervised fine-tuning.")
    gold: JudgeConfig = Field(description="The gold scorer: simulated labelers rank by it; the main evaluation judge.")
    second_judge: JudgeConfig = Field(description="An independent judge for the evaluation.")
    labeling: LabelingConfig = Field(LabelingConfig(), description="Comparison collection.")
    rm: RMTrainConfig = Field(RMTrainConfig(), description="Reward-model training.")
    rm_retrain: RMRetrainConfig = Field(
        RMRetrainConfig(),
        description="Retraining rounds: the RM is trained again from the SFT model on the comparisons of all rounds, then "
        "loaded into the reward service with a new version.",
    )
    rm_job: Literal["learner", "launcher"] = Field(
        "learner",
        description='Where reward models train: "learner" (its TrainRewardModel RPC, between PPO steps) or "launcher" '
        "(`alignd job train-rm` through the coordinator's launcher: a local process, or a Kubernetes Job with "
        "launcher.kind: kubernetes).",
    )
    value_from_rm: bool = Field(
        True, description="Initialise the learner's value model from the reward model (the paper); false with a value head on the policy."
    )
    ppo: PPORunConfig = Field(description="The PPO stage (prompts, steps, sampling).")
    evaluation: EvaluationConfig = Field(description="Held-out evaluation.")
    seed: int = Field(
        0,
        description="The run's seed: prompt selection, labelers and evaluation sampling, and the seed of sft, rm and ppo "
        "(and, in `alignd run`, of the learner) where those are not set themselves. One number changes every stage's "
        "randomness (bench/presets.py runs a preset over seeds this way).",
    )
    skip_bad_lines: bool = Field(
        False,
        description="Drop malformed lines of the data files (demonstrations, prompts) instead of refusing to start; each is "
        "counted and reported (file:line) in state.json and report.json. Also sets sft/rm.skip_bad_lines.",
    )

    @model_validator(mode="after")
    def _stage_seeds(self) -> "PipelineConfig":
        for stage in (self.sft, self.rm, self.ppo):
            if "seed" not in stage.model_fields_set:
                stage.seed = self.seed
        return self

    @field_validator("demonstrations")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(os.path.expandvars(v))


ROLE_CONFIGS: dict[str, type[RoleConfig]] = {
    "policy": PolicyConfig,
    "reward": RewardConfig,
    "reference": ReferenceConfig,
    "learner": LearnerConfig,
    "coordinator": CoordinatorConfig,
}
ROLES = tuple(ROLE_CONFIGS)


class RestartConfig(Strict):
    """How the local stack restarts a role process that exits on its own (Kubernetes' restartPolicy, locally)."""

    policy: Literal["on_failure", "always", "never"] = Field(
        "on_failure",
        description="on_failure: restart a role that exits non-zero or is killed; always: also one that exits 0; "
        "never: a role that exits stops the whole stack (the launcher exits 1 naming it).",
    )
    max_restarts: int = Field(
        5, ge=0,
        description="Restarts of one role allowed within reset_after_seconds; one more stops the stack (exit 1).",
    )
    backoff_initial_seconds: float = Field(1.0, ge=0, description="Wait before the first restart of a role, in seconds.")
    backoff_max_seconds: float = Field(
        30.0, ge=0, description="The wait doubles with each restart within reset_after_seconds, up to this, in seconds."
    )
    reset_after_seconds: float = Field(
        600.0, gt=0, description="Restarts older than this no longer count toward max_restarts or the backoff, in seconds."
    )

    def backoff(self, recent: int) -> float:
        """Seconds to wait before a restart, when `recent` restarts happened within reset_after_seconds."""
        return min(self.backoff_max_seconds, self.backoff_initial_seconds * (2.0 ** min(recent, 30)))


class StackConfig(Strict):
    """`alignd up`: every role as a local child process on loopback.

    Addresses between roles are filled in by the launcher (ports are
    ephemeral unless a role's server.port is set).
    """

    startup_timeout_seconds: float = Field(600.0, gt=0, description="Per role: model load + warm-up, in seconds.")
    stop_grace_seconds: float = Field(15.0, ge=0, description="On stop, children get SIGTERM, then SIGKILL after this many seconds.")
    restart: RestartConfig = Field(
        default_factory=RestartConfig,
        description="Restarting a role that dies: on the same ports, with backoff and a limit (stack.json: restarts).",
    )
    policy: PolicyConfig = Field(description="The policy role.")
    reward: RewardConfig = Field(description="The reward role.")
    reference: ReferenceConfig = Field(description="The reference role.")
    learner: LearnerConfig = Field(description="The learner role.")
    coordinator: CoordinatorConfig = Field(
        CoordinatorConfig(), description="The coordinator role; its addresses are filled in by the launcher."
    )


class PipelineJobConfig(Strict):
    """`alignd run --config FILE`: a local stack plus one pipeline run on it."""

    stack: StackConfig = Field(description="The local stack (see StackConfig).")
    pipeline: PipelineConfig = Field(description="The pipeline.")

    @model_validator(mode="after")
    def _learner_seed(self) -> "PipelineJobConfig":
        if "seed" not in self.stack.learner.model_fields_set:
            self.stack.learner.seed = self.pipeline.seed
        return self


class PPOJobConfig(Strict):
    """`alignd ppo --config FILE`: a local stack plus one PPO run on it."""

    stack: StackConfig = Field(description="The local stack (see StackConfig).")
    run: PPORunConfig = Field(description="The PPO run.")

    @model_validator(mode="after")
    def _learner_seed(self) -> "PPOJobConfig":
        if "seed" not in self.stack.learner.model_fields_set:
            self.stack.learner.seed = self.run.seed
        return self


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value is not valid YAML: {err}") from None
        out.append((key, value))
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def build_config(model: type[Strict], data: dict[str, Any] | None, overrides: list[str] | None = None):
    raw = copy.deepcopy(data or {})
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid {model.__name__}: {format_validation_error(err)}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {p}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(model: type[Strict], path: str | Path | None, overrides: list[str] | None = None):
    """Reads YAML from `path` (optional), applies overrides, validates."""
    return build_config(model, load_yaml(path) if path else {}, overrides)


def dump_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md), generated from the models."""
    out = [
        "# Configuration reference",
        "",
        "Generated from `libs/alignd/config.py` by `python scripts/gen_config_docs.py`; "
        "tests/test_config_docs.py fails when it is stale.",
        "",
        "Each role reads one YAML file (`alignd serve ROLE --config FILE`); the local stack reads one file "
        "with a section per role (`alignd up --config FILE`, see `configs/local.yaml`). Any key can be "
        "overridden with `--set dotted.key=value` (the value is parsed as YAML). Unknown keys are errors.",
        "",
    ]
    seen: set[type] = set()

    def type_name(ann) -> str:
        text = getattr(ann, "__name__", None) if isinstance(ann, type) else None
        return (text or str(ann).replace("typing.", "")).replace("|", "\\|")

    def section(title: str, model: type[BaseModel], prefix: str) -> None:
        out.append(f"## {title}")
        out.append("")
        if model.__doc__ and model is not Strict:
            out.append(model.__doc__.strip().splitlines()[0])
            out.append("")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        nested = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            models_in = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if models_in:  # an optional section (`X | None`)
                sub = models_in[0]
                out.append(f"| `{prefix}{name}` | section or null | `None` | {field.description or ''} |")
                nested.append((name, sub))
                continue
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                default = "" if field.is_required() else "(section)"
                out.append(f"| `{prefix}{name}` | section | {default} | {field.description or ''} |")
                nested.append((name, ann))
                continue
            default = "required" if field.is_required() else f"`{field.default!r}`"
            out.append(f"| `{prefix}{name}` | `{type_name(ann)}` | {default} | {field.description or ''} |")
        out.append("")
        for name, sub in nested:
            if sub in seen:
                continue
            seen.add(sub)
            section(f"`{name}`: {sub.__name__}", sub, f"{name}.")

    for role, model in ROLE_CONFIGS.items():
        section(f"Role `{role}` ({model.__name__})", model, "")
    seen.update(ROLE_CONFIGS.values())  # the stack's role sections are the role configs above
    section("Local stack (StackConfig)", StackConfig, "")
    seen.add(StackConfig)
    section("PPO job (PPOJobConfig): `alignd ppo --config FILE`", PPOJobConfig, "")
    seen.update({PPORunConfig, SFTConfig, RMTrainConfig})
    section("Pipeline job (PipelineJobConfig): `alignd run --config FILE`", PipelineJobConfig, "")
    seen.difference_update({SFTConfig, RMTrainConfig})
    section("SFT job (SFTConfig): LearnerService.TrainSFT `config_yaml`", SFTConfig, "")
    section("Reward-model job (RMTrainConfig): LearnerService.TrainRewardModel `config_yaml`", RMTrainConfig, "")
    return "\n".join(out).rstrip() + "\n"
