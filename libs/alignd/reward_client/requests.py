"""The requests of a call: (prompt, response) text or token-id pairs checked into ScoreItems, split into
batches, and the answers assembled in input order.

The SDK's usage and behaviour are in the package docstring (`alignd.reward_client`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from alignd.reward_client.results import ScoreManyResult, ScoreResult
from alignd.v1 import reward_pb2


def _pair(pair: Any, keys: tuple[str, str], what: str, *, where: str) -> tuple[Any, Any]:
    """The two halves of `pair`: a mapping with `keys`, or a 2-sequence."""
    if isinstance(pair, Mapping):
        missing = [k for k in keys if k not in pair]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
        return pair[keys[0]], pair[keys[1]]
    if isinstance(pair, Sequence) and not isinstance(pair, (str, bytes)) and len(pair) == 2:
        return pair[0], pair[1]
    raise TypeError(f"{where}: expected a {what} pair or a mapping with {keys[0]!r} and {keys[1]!r}")


def _text_pair(pair: Any, where: str) -> tuple[str, str]:
    prompt, response = _pair(pair, ("prompt", "response"), "(prompt, response)", where=where)
    for name, value in (("prompt", prompt), ("response", response)):
        if not isinstance(value, str):
            raise TypeError(f"{where}: {name} must be a string, got {type(value).__name__}")
    return prompt, response


def _id_list(ids: Any, where: str) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{where}: expected a list of token ids, got {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int) or not -(2**31) <= i < 2**31:
            raise ValueError(f"{where}: token ids must be 32-bit integers, got {i!r}")
    return out


def _token_pair(pair: Any, where: str) -> tuple[list[int], list[int]]:
    prompt, response = _pair(
        pair, ("prompt_token_ids", "response_token_ids"), "(prompt ids, response ids)", where=where
    )
    return _id_list(prompt, f"{where} prompt"), _id_list(response, f"{where} response")


def _text_items(pairs: Iterable[Any]) -> list[reward_pb2.ScoreItem]:
    items = []
    for i, pair in enumerate(pairs):
        prompt, response = _text_pair(pair, f"pairs[{i}]")
        items.append(reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=prompt, response=response)))
    return items


def _token_items(pairs: Iterable[Any]) -> list[reward_pb2.ScoreItem]:
    items = []
    for i, pair in enumerate(pairs):
        prompt, response = _token_pair(pair, f"pairs[{i}]")
        items.append(
            reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=prompt, response_token_ids=response))
        )
    return items


def _chunks(items: list, batch_size: int, max_in_flight: int) -> list[list]:
    for name, value in (("batch_size", batch_size), ("max_in_flight", max_in_flight)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def _result(resp: reward_pb2.ScoreResponse) -> ScoreResult:
    return ScoreResult(list(resp.scores), int(resp.weight_version))


def _many(results: list[ScoreResult]) -> ScoreManyResult:
    scores: list[float] = []
    versions: list[int] = []
    for r in results:
        scores.extend(r.scores)
        versions.extend([r.weight_version] * len(r.scores))
    return ScoreManyResult(scores, versions)
