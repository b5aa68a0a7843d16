"""The model roles' configurations: policy, reward, reference and learner (models, batching, the reward APIs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from alignd.config.base import CIDRList, Strict, expand_path
from alignd.config.server import RoleClientConfig, RoleConfig
from alignd.config.training import EngineConfig, OptimizerConfig, PPOConfig
from alignd.paper import PAPER_DEFAULTS as PAPER


class ModelConfig(Strict):
    """A Hugging Face model directory loaded with `from_pretrained`."""

    path: str = Field(
        description='save_pretrained directory (config.json, weights, tokenizer); "~" and $VARS are expanded.'
    )
    name: str | None = Field(None, description="Name reported by GetInfo; default: the directory name.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight and compute dtype. Use float32 on CPU (bf16 matmuls are ~100x slower there)."
    )
    device: str = Field("cpu", description='Torch device, e.g. "cpu" or "cuda:0".')
    max_context_tokens: int | None = Field(
        None, ge=2, description="Longest prompt + response in tokens; default: the model's max_position_embeddings."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the directory (transformers trust_remote_code)."
    )
    chat_template: str = Field(
        "auto",
        description="How conversations become tokens (docs/chat.md): auto (the tokenizer's chat template; plain "
        "text if it has none), none (plain text: the messages' contents joined by a blank line), or the path of "
        "a Jinja template file.",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_path(v)

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if v in ("auto", "none"):
            return v
        if not v.strip():
            raise ValueError("must be auto, none or the path of a Jinja template file")
        return expand_path(v)


class BatchingConfig(Strict):
    """Dynamic batching of concurrent requests."""

    max_batch_size: int = Field(
        32, ge=1, description="Sequences per forward batch; larger requests run in chunks of this size."
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        description="How long the first request of a batch that is not full waits for others, in milliseconds.",
    )
    max_queue: int = Field(
        256, ge=1, description="Requests allowed to wait; beyond this, calls answer RESOURCE_EXHAUSTED."
    )


# Each role's batching section is its own model with the role's defaults, so that a partial section
# (`batching: {max_queue: 512}`) keeps the role's other defaults instead of BatchingConfig's.
class PolicyBatchingConfig(BatchingConfig):
    """Dynamic batching of Generate calls."""

    max_wait_ms: float = Field(
        20.0,
        ge=0,
        description="How long the first request of a batch that is not full waits for others, in milliseconds. "
        "20 lets a burst of concurrent calls form one batch (bench/README.md: 11x over sequential generate vs 7.6x at "
        "5 ms).",
    )


class ReferenceBatchingConfig(BatchingConfig):
    """Dynamic batching of LogProbs calls."""

    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long a lone request waits for company, in milliseconds; 0: calls that arrive "
        "while a batch runs join the next one.",
    )


class RewardBatchingConfig(BatchingConfig):
    """Dynamic batching of Score calls, bounded in sequences and in tokens."""

    max_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long a lone request waits for company, in milliseconds; 0: calls that arrive "
        "while a batch runs join the next one, and a lone call is not delayed (bench/README.md).",
    )

    max_batch_tokens: int | None = Field(
        16384,
        ge=1,
        description="Token budget of one batch: the batcher stops collecting requests once their prompt + response "
        "tokens would exceed it, and the engine runs a batch as forward passes of at most max_batch_size rows and "
        "this many padded tokens (rows x longest row; rows are sorted by length first). null: rows only.",
    )


class RewardHTTPConfig(Strict):
    """The reward role's HTTP API: OpenRLHF's remote reward model protocol (POST /get_reward), on uvicorn."""

    port: int = Field(
        0, ge=-1, le=65535, description="HTTP port; 0 = an ephemeral port (stack.json: http_url), -1 = disabled."
    )
    host: str | None = Field(None, description="Interface the HTTP server binds; default: server.host.")
    max_connections: int = Field(
        1024,
        ge=1,
        description="Connections held at once. At the cap a new connection evicts the one that has waited longest "
        "for its request headers (idle keep-alive or trickling); it is refused 503 only when every connection is "
        "inside a request. Connections cost a few KB each (one event loop), not a thread.",
    )
    max_connections_per_client: int = Field(
        64, ge=1, description="Connections from one IP address at once; beyond, 503 and closed at once."
    )
    connection_cap_exempt_networks: CIDRList = Field(
        [],
        description="CIDRs not held to max_connections_per_client (an ingress or load balancer that carries "
        "many clients' connections from one address).",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="From a connection's accept (or the end of the previous answer) to the end of the request's "
        "headers, in seconds, however the bytes trickle in; then 408 and closed.",
    )
    body_timeout_seconds: float = Field(
        30.0, gt=0, description="Time to receive a request's body, in seconds; then 408."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        description="Largest request body, in bytes: refused 413 from its Content-Length before it is read (counted "
        "while read for a chunked body).",
    )
    max_json_depth: int = Field(
        64, ge=2, description="Deepest nesting of arrays and objects in a body, checked before parsing."
    )
    max_concurrent_requests: int = Field(
        64, ge=1, description="Requests parsed and scored at once (worker threads); /health never waits for them."
    )
    timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="Deadline of one /get_reward request (queue + scoring), in seconds; a caller may ask for less "
        "with the X-Request-Timeout header. Work whose deadline passed is dropped, answered 504.",
    )
    idle_timeout_seconds: float = Field(
        30.0, ge=1, description="A keep-alive connection idle this long after an answer is closed, in seconds."
    )


class RewardLimitsConfig(Strict):
    """Request limits of the reward APIs (gRPC Score and HTTP /get_reward alike)."""

    max_items: int = Field(
        1024, ge=1, description="Items (gRPC) or queries (HTTP) in one request; more: INVALID_ARGUMENT / 400."
    )
    max_text_bytes: int = Field(
        262144,
        ge=1,
        description="UTF-8 bytes of one prompt or response text (a query over HTTP); more: INVALID_ARGUMENT / 400.",
    )
    too_long: Literal["reject", "truncate_left"] = Field(
        "reject",
        description="Inputs whose prompt + response exceed the model's context: reject (INVALID_ARGUMENT / 400 naming "
        "the item) or truncate_left (drop the oldest tokens, prompt first, keeping the end of the response that "
        "the score reads).",
    )


class VllmConfig(Strict):
    """The policy's vLLM engine (policy.engine: vllm; docs/vllm.md). The model, its dtype and context come from
    policy.model; these are vLLM's own settings."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs the model is split over (vLLM tensor parallelism).")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Share of each GPU's memory vLLM may take for the weights and its KV cache (lower it when the "
        "policy shares its GPUs).",
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Longest prompt + response vLLM plans its KV cache for; default: the model's context."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="vLLM's weight and compute dtype; auto: policy.model.dtype."
    )
    enable_sleep_mode: bool = Field(
        False,
        description="Let the engine free its GPU memory between rollouts (a policy colocated with training on the "
        "same GPUs; vLLM's sleep mode, CUDA only).",
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (the K samples of a labeling prompt)."
    )
    enforce_eager: bool = Field(
        False, description="Run without CUDA graphs (slower decoding, faster start, less memory). CPU runs are eager."
    )
    max_num_seqs: int = Field(256, ge=1, description="Sequences vLLM schedules at once (its continuous batch).")
    max_num_batched_tokens: int = Field(
        16384,
        ge=1,
        description="Tokens one engine step processes. 16384 prefills a labeling round's prompts in one step; on CPU, "
        "seeded requests whose prefill is split over steps crash vLLM 0.32 (ENV.md).",
    )
    logprobs_mode: Literal["sampled", "raw"] = Field(
        "sampled",
        description="Which log-probs the engine returns (vLLM computes one kind per engine): sampled (the "
        "distribution sampled from: LOGPROB_MODE_SAMPLED, what PPO rollouts ask) or raw (LOGPROB_MODE_RAW). A "
        "request for the other kind is served where both are equal (temperature 1 without top-k/top-p, or greedy) "
        "and answers FAILED_PRECONDITION otherwise.",
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="GiB for the KV cache (vLLM's kv_cache_memory_bytes) instead of what gpu_memory_utilization "
        "leaves; default: that share on GPUs, 2 on CPU (where gpu_memory_utilization would reserve that share of "
        "the host's memory).",
    )
    start_timeout_s: float = Field(600.0, gt=0, description="How long the engine may take to start.")


class PolicyConfig(RoleConfig):
    """policy: samples responses (alignd.v1.PolicyService + ModelService)."""

    model: ModelConfig = Field(description="The policy's causal LM.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="What generates: transformers (alignd's batched KV-cache loop over the transformers model; the "
        "default, as fast as vLLM or faster on CPU) or vllm (vLLM's engine: continuous batching, paged KV cache, "
        "prefix caching, tensor parallelism; the choice on GPUs; needs the vllm extra; docs/vllm.md).",
    )
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="The vLLM engine's settings (engine: vllm).")
    batching: PolicyBatchingConfig = Field(
        default_factory=PolicyBatchingConfig,
        description="Dynamic batching of Generate calls. The 20 ms default wait lets a burst of concurrent calls "
        "form one batch (bench/README.md: 11x over sequential generate vs 7.6x at 5 ms). With engine: vllm, vLLM "
        "batches instead and only max_queue applies (Generate calls in flight).",
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
    limits: RewardLimitsConfig = Field(
        default_factory=RewardLimitsConfig, description="Request limits and the context policy."
    )
    http: RewardHTTPConfig = Field(
        default_factory=RewardHTTPConfig,
        description="HTTP API (OpenRLHF's POST /get_reward), with the same authentication, TLS, limits and batcher as "
        "gRPC.",
    )
    allow_new_head: bool = Field(
        False,
        description="Serve a directory without a trained scalar head (randomly initialised). Off: a random reward is "
        "a silent bug.",
    )


class ReferenceConfig(RoleConfig):
    """reference: log-probs of the frozen SFT model (alignd.v1.ReferenceService + ModelService)."""

    model: ModelConfig = Field(description="The frozen reference (SFT) causal LM.")
    batching: ReferenceBatchingConfig = Field(
        default_factory=ReferenceBatchingConfig,
        description="Dynamic batching of LogProbs calls (no wait by default, as for reward).",
    )


class LearnerConfig(RoleConfig):
    """learner: PPO / SFT / RM training (alignd.v1.LearnerService + ModelService)."""

    model: ModelConfig = Field(description="The policy to train (its initial weights).")
    value_model: ModelConfig | None = Field(
        None,
        description="Initial weights of the value model (a one-label *ForSequenceClassification, e.g. the reward "
        "model's "
        "directory, as in the paper). Required unless value_head_on_policy.",
    )
    value_head_on_policy: bool = Field(
        False, description="Use a value head on the policy's backbone instead of a separate value model."
    )
    ppo: PPOConfig = Field(PPOConfig(), description="PPO hyper-parameters.")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="Optimizer and LR schedule.")
    engine: EngineConfig = Field(EngineConfig(), description="Training engine.")
    ema_decay: float | None = Field(
        PAPER.ema_decay, gt=0, lt=1, description="EMA of the policy weights (the paper: 0.992); null disables."
    )
    seed: int = Field(0, description="Seed of minibatch shuffling and initialisation.")
    checkpoint_dir: str | None = Field(
        None,
        description="Where checkpoints go; default: RUN_DIR/learner/checkpoints. The learner resumes from the latest "
        "one.",
    )
    checkpoint_every_steps: int = Field(
        1,
        ge=0,
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
        1 << 20,
        ge=1024,
        le=16 << 20,
        description="Chunk size of the weight stream, in bytes (at most the replicas' request limit of an "
        "UpdateWeights message, server.limits.max_request_bytes: 16 MiB by default).",
    )
    weight_sync: Literal["auto", "stream", "filesystem", "collective"] = Field(
        "auto",
        description='How new policy weights reach the replicas: "stream" (ModelService.UpdateWeights over gRPC), '
        '"filesystem" (written once to weight_sync_dir, loaded by each replica with LoadWeights), "collective" '
        "(a torch.distributed broadcast from this learner to the vLLM workers of every replica that can join a "
        "weight group: NCCL on GPUs, gloo on CPU; the others, and every replica when the group cannot be formed or a "
        'broadcast fails, get the stream; docs/vllm.md), or "auto": filesystem through shared memory (a directory '
        "of this process under /dev/shm, removed when it exits) when every replica is on loopback (the local stack) "
        "and /dev/shm has room for three copies of the policy, stream otherwise (about 3x faster for SmolLM2-135M on 2 "
        "cores: bench/NOTES.md).",
    )
    weight_sync_dir: str | None = Field(
        None, description="Shared directory for weight_sync: filesystem; default: next to the checkpoints."
    )
    weight_group_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="weight_sync: collective: the group's backend; auto: nccl when CUDA is there, else gloo."
    )
    weight_group_host: str | None = Field(
        None,
        description="weight_sync: collective: the address the replicas reach this learner's group store at "
        "(its TCP port is chosen when the group forms); default: 127.0.0.1 when every replica is on loopback, else "
        "this host's name resolved (in Kubernetes, the pod's IP: set it from the downward API).",
    )
    weight_group_timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="weight_sync: collective: how long forming the group and each broadcast may take before the "
        "push falls back to the stream.",
    )
