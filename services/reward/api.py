"""What the reward role's two APIs share: input checks, limits, the context policy, scoring, metrics.

The gRPC servicer (`Score`) and the HTTP API (`POST /get_reward`) are thin
adapters over `RewardAPI`: both turn their request into (prompt ids,
response ids) pairs here, with the same limits (`limits.*`) and the same
policy for inputs longer than the model's context, and both score through
the same dynamic batcher, so the same input gets the same score from either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram

from alignd.config import RewardLimitsConfig
from alignd.models.handle import ModelHandle
from alignd.models.inputs import chat_pair_ids, check_ids, tokenize
from alignd.runtime.errors import AligndError, InvalidArgument
from alignd.runtime.metrics import LATENCY_BUCKETS_SECONDS

APIS = ("grpc", "http")
# Reasons a request is refused, for alignd_reward_rejected_total (bounded).
REASONS = (
    "unauthenticated",
    "invalid_argument",
    "resource_exhausted",
    "deadline_exceeded",
    "unavailable",
    "internal",
)
ANONYMOUS = "anonymous"  # the client label without server.auth


class RewardAPIMetrics:
    """alignd_reward_* metrics per API and per client (the token's configured name, never the token)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "alignd_reward_requests_total",
            "Scoring requests answered, by API (grpc, http), client (token name; anonymous without "
            "authentication; trusted-network) and gRPC status code.",
            ["api", "client", "code"],
            registry=registry,
        )
        self.items = Counter(
            "alignd_reward_items_total", "Items scored, by API and client.", ["api", "client"], registry=registry
        )
        self.seconds = Histogram(
            "alignd_reward_request_seconds",
            "Time from receiving a scoring request to answering it (validation, queue, scoring), in seconds.",
            ["api", "client"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=registry,
        )
        self.rejected = Counter(
            "alignd_reward_rejected_total",
            "Scoring requests refused, by API and reason (unauthenticated, invalid_argument, resource_exhausted, "
            "deadline_exceeded, unavailable, internal).",
            ["api", "reason"],
            registry=registry,
        )
        self.truncated = Counter(
            "alignd_reward_truncated_items_total",
            "Items longer than the model's context that were truncated from the left (limits.too_long).",
            registry=registry,
        )
        for api in APIS:
            for reason in REASONS:
                self.rejected.labels(api, reason)
        self._children: dict = {}

    def child(self, metric, *labels: str):
        """metric.labels(*labels), cached: the lookup costs more than the update, on every request."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class RewardAPI:
    """Checks, scores and counts one request of either API."""

    def __init__(self, loaded, limits: RewardLimitsConfig, metrics: RewardAPIMetrics, *, batch_metrics) -> None:
        self.loaded = loaded  # Loaded[RewardState]
        self.limits = limits
        self.metrics = metrics
        self.batch_metrics = batch_metrics  # alignd.runtime.metrics.BatchMetrics

    # ---- inputs -------------------------------------------------------------------------------------------------

    def check_count(self, n: int, field: str) -> None:
        if n == 0:
            raise InvalidArgument(field, "empty batch: at least one item is required")
        if n > self.limits.max_items:
            raise InvalidArgument(
                field, f"{n} items in one request; at most {self.limits.max_items} (limits.max_items)"
            )

    def text_ids_size(self, text: str, field: str) -> None:
        """InvalidArgument unless `text` is valid Unicode of at most limits.max_text_bytes UTF-8 bytes."""
        if len(text) > self.limits.max_text_bytes:  # at least one byte per character: no need to encode it
            raise InvalidArgument(field, f"over {self.limits.max_text_bytes} bytes of text (limits.max_text_bytes)")
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidArgument(field, "not valid Unicode text (a lone surrogate)") from None
        if size > self.limits.max_text_bytes:
            raise InvalidArgument(
                field, f"{size} bytes of text; at most {self.limits.max_text_bytes} (limits.max_text_bytes)"
            )

    def text_ids(self, handle: ModelHandle, text: str, field: str) -> list[int]:
        self.text_ids_size(text, field)
        return tokenize(handle, text) if text else []

    def fit(
        self, handle: ModelHandle, prompt: list[int], response: list[int], *, field: str
    ) -> tuple[list[int], list[int]]:
        """The pair within the model's context, by the configured policy (limits.too_long)."""
        total, limit = len(prompt) + len(response), handle.max_context
        if total <= limit:
            return prompt, response
        if self.limits.too_long == "reject":
            raise InvalidArgument(
                field,
                f"prompt + response of {total} tokens exceeds the context of {limit} tokens "
                "(limits.too_long: reject; truncate_left keeps the last tokens)",
            )
        cut = total - limit  # drop the oldest tokens: the prompt's first, then the response's
        self.metrics.truncated.inc()
        if cut <= len(prompt):
            return prompt[cut:], response
        return [], response[cut - len(prompt) :]

    def text_pair(
        self, handle: ModelHandle, prompt: str, response: str, *, field: str, prompt_field: str, response_field: str
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of a text pair: the two texts are tokenized separately, as the policy
        produced them."""
        if not response:
            raise InvalidArgument(response_field, "empty response")
        p = self.text_ids(handle, prompt, prompt_field)
        r = self.text_ids(handle, response, response_field)
        if not r:
            raise InvalidArgument(response_field, "response has no tokens")
        return self.fit(handle, p, r, field=field)

    def chat_pair(self, handle: ModelHandle, prompt, response: str, *, field: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of a conversation and its reply, rendered with the reward model's chat
        template (alignd.chat), within the limits and the context."""
        for i, m in enumerate(prompt.messages):
            self.text_ids_size(m.content, f"{field}.prompt.messages[{i}].content")
        self.text_ids_size(response, f"{field}.response")
        p, r = chat_pair_ids(handle, prompt, response, field=field)
        if not r:
            raise InvalidArgument(f"{field}.response", "response has no tokens")
        return self.fit(handle, p, r, field=field)

    def token_pair(self, handle: ModelHandle, prompt: Sequence[int], response: Sequence[int], *, field: str):
        p = check_ids(prompt, handle.vocab_size, f"{field}.prompt_token_ids")
        r = check_ids(response, handle.vocab_size, f"{field}.response_token_ids")
        if not r:
            raise InvalidArgument(f"{field}.response_token_ids", "empty response")
        return self.fit(handle, p, r, field=field)

    # ---- scoring ------------------------------------------------------------------------------------------------

    def score(self, state, pairs: list[tuple[list[int], list[int]]], timeout: float | None) -> tuple[list[float], int]:
        """Scores through the batcher; DeadlineExceeded when `timeout` (seconds) runs out first."""
        tokens = sum(len(p) + len(r) for p, r in pairs)
        (scores, version), pending, _info = state.batcher.run(pairs, len(pairs), timeout, tokens=tokens)
        self.batch_metrics.queue_seconds.observe(pending.queue_seconds)
        self.metrics.child(self.batch_metrics.tokens, "scored").inc(tokens)
        if not all(math.isfinite(s) for s in scores):
            raise FloatingPointError("the reward model produced a non-finite score")
        return scores, version

    def observe(self, api: str, client: str | None, started: float, *, code: str, items: int = 0) -> None:
        client = client or ANONYMOUS
        m = self.metrics
        m.child(m.requests, api, client, code).inc()
        m.child(m.seconds, api, client).observe(time.perf_counter() - started)
        if code == "OK":
            m.child(m.items, api, client).inc(items)
        else:
            reason = code.lower() if code.lower() in REASONS else "internal"
            m.child(m.rejected, api, reason).inc()


def status_name(exc: BaseException) -> str:
    """The gRPC status name an exception is answered with."""
    return exc.code.name if isinstance(exc, AligndError) else "INTERNAL"
