"""A role's server: gRPC and metrics endpoints, authentication, per-client limits, TLS, fault injection, the
credentials it presents to other roles, and where paths in requests may lead (alignd.runtime)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from alignd.config.base import CIDRList, Strict, expand_path


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
        32,
        ge=1,
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
        30.0,
        gt=0,
        description="A client stream (UpdateWeights) that sends no message for this long is ended DEADLINE_EXCEEDED, "
        "releasing what it holds (the replica's weight-update slot).",
    )
    max_health_watchers: int = Field(
        256,
        ge=1,
        description="Open grpc.health.v1 Watch streams in all; beyond it Watch answers RESOURCE_EXHAUSTED "
        "(Check still answers: probes use Check).",
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
        return expand_path(v)

    @model_validator(mode="after")
    def _pairs(self) -> TLSConfig:
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

    delay_seconds: float = Field(
        0.0, ge=0, description="Added before each matching RPC is served, in seconds; 0 = off."
    )
    methods: list[str] = Field(
        [],
        description='RPC method names to delay, e.g. ["Generate"]; empty = every RPC of the role (health checks '
        "never).",
    )


class ServerConfig(Strict):
    """gRPC and metrics endpoints of one role."""

    host: str = Field("127.0.0.1", description='Interface the gRPC server binds; "0.0.0.0" in containers.')
    port: int = Field(
        0, ge=0, le=65535, description="gRPC port; 0 = an ephemeral port (see the endpoint file / stack.json)."
    )
    metrics_host: str = Field("127.0.0.1", description="Interface of the Prometheus /metrics HTTP endpoint.")
    metrics_port: int = Field(0, ge=-1, le=65535, description="/metrics port; 0 = ephemeral, -1 = disabled.")
    health_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="A second port, plaintext, serving grpc.health.v1 only: for Kubernetes' gRPC probes, which speak "
        "no TLS, when server.tls is on (the chart's tls). -1 = none; 0 = ephemeral.",
    )
    metrics_tls: bool = Field(
        False,
        description="Serve /metrics over HTTPS with server.tls's certificate (requiring a client certificate when "
        "tls.client_ca_file is set). Off: plain HTTP.",
    )
    max_workers: int = Field(
        128,
        ge=1,
        description="Threads serving RPCs; each waiting call holds one, so keep it above batching.max_batch_size "
        "(the model itself runs on one batcher thread) and above limits.max_concurrent_calls_per_client. Health "
        "checks and refused calls have threads of their own.",
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Largest gRPC message the transport accepts or sends, in bytes; limits.max_request_bytes sets "
        "smaller limits per method.",
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="On SIGTERM, in-flight RPCs get this long to finish, in seconds."
    )
    auth: AuthConfig = Field(
        default_factory=AuthConfig, description="Tokens and scopes (on by default: docs/security.md)."
    )
    limits: ServerLimitsConfig = Field(
        default_factory=ServerLimitsConfig, description="Per-client concurrency, request sizes, idle streams."
    )
    tls: TLSConfig = Field(
        default_factory=TLSConfig, description="TLS / mutual TLS from certificate files (off by default)."
    )
    fault_injection: FaultInjectionConfig = Field(
        default_factory=FaultInjectionConfig, description="Injected delays for chaos drills (off by default)."
    )

    @model_validator(mode="after")
    def _metrics_tls_needs_tls(self) -> ServerConfig:
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
        return expand_path(v)

    @model_validator(mode="after")
    def _pairs(self) -> RoleClientConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("cert_file (mutual TLS) needs ca_file (TLS)")
        if self.token_name is not None and self.tokens_file is None:
            raise ValueError("token_name needs tokens_file")
        return self


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
        return [expand_path(r) for r in v]


class RoleConfig(Strict):
    server: ServerConfig = Field(ServerConfig(), description="gRPC and metrics endpoints.")
    paths: PathsConfig = Field(default_factory=PathsConfig, description="Where paths in requests may lead.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="structlog level; prompts and responses are only logged at debug."
    )
    torch_threads: int = Field(0, ge=0, description="torch intra-op threads; 0 = torch's default (all cores).")
