"""The Python client SDK of the reward service (alignd.v1.RewardService).

    from alignd.reward_client import RewardClient

    with RewardClient("reward.example:50051", token_file="/run/secrets/reward-token", tls=True) as client:
        result = client.score([("What is 2+2?", " 4"), {"prompt": "Hi", "response": " Hello!"}])
        result.scores, result.weight_version

`RewardClient` is synchronous and thread-safe (one channel, any number of
threads); `AsyncRewardClient` is the same API on `grpc.aio`. Both:

* send the bearer token (`token=` or `token_file=`) as `authorization: Bearer
  <token>` metadata on every call;
* use TLS when `tls=True` or any certificate file is given (mutual TLS with
  `cert_file` + `key_file`);
* give every call a deadline (`timeout`, seconds, from the first attempt) and
  retry UNAVAILABLE only, up to `retries` attempts in all, with exponential
  backoff and full jitter, never past the deadline; the channel's own retries
  are off, so this is the only retry layer;
* raise `RewardClientError` (`.code`, a `grpc.StatusCode`; `.details`;
  `.attempts`) for every failed call, so callers need not catch grpc errors.

`score_many` splits a long list into requests of `batch_size` items, runs up
to `max_in_flight` of them at once over the one channel and returns the
scores in input order. Logging (structlog): `reward_client_token_without_tls`
(warning, once per client) when a token would travel in clear text to a host
other than loopback; `reward_client_retry` (debug) before each retry, only
when the application has configured structlog.

Layout: `clients` (RewardClient, AsyncRewardClient), `results` (ScoreResult, ScoreManyResult,
RewardClientError), `settings` (the constructor's arguments checked, the retry schedule of a call, on
alignd.runtime.retry.Backoff), `requests` (pairs into ScoreItems, batches, answers in order).
"""

from __future__ import annotations

from alignd.reward_client.clients import REWARD_SERVICE as REWARD_SERVICE
from alignd.reward_client.clients import AsyncRewardClient, RewardClient
from alignd.reward_client.results import RewardClientError, ScoreManyResult, ScoreResult
from alignd.reward_client.settings import RETRYABLE_CODES as RETRYABLE_CODES
from alignd.reward_client.settings import _RetryPolicy as _RetryPolicy

# REWARD_SERVICE, RETRYABLE_CODES and _RetryPolicy (tests/test_reward_client.py) are importable from here
# too, outside __all__ as before the split.
__all__ = ["AsyncRewardClient", "RewardClient", "RewardClientError", "ScoreManyResult", "ScoreResult"]
