"""A client of the coordinator's runs (alignd.v1.CoordinatorService): start, list, watch, stop a run and fetch its
files. What `alignd runs` uses; usable from Python too.

    from alignd.runs_client import RunsClient

    with RunsClient("coordinator.example:50051", token_file="/run/secrets/alignd-token", tls=True) as client:
        run = client.start(config_yaml, run_id="smollm2-1")
        run = client.watch(run.run_id, on_update=print)        # until it ends
        client.fetch_files(run.run_id, "smollm2-1/")           # report.md, report.json, plots/...

Credentials and TLS are the reward client's (`alignd.reward_client`: bearer token from `token` or `token_file`,
TLS or mutual TLS from certificate files); every call has a deadline, and UNAVAILABLE (a coordinator pod restarting)
is retried with backoff: within `timeout` for a call, for `unavailable_grace_s` while watching. Failures raise
RunsClientError (.code, .details). Files are checked against the size and SHA-256 the coordinator sends and
written atomically, so an interrupted fetch leaves no partial file.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

import grpc

from alignd.atomic import write_bytes_atomic
from alignd.reward_client.settings import _Settings
from alignd.v1 import coordinator_pb2, coordinator_pb2_grpc

__all__ = ["TERMINAL", "RunsClient", "RunsClientError", "state_name"]

TERMINAL = {
    coordinator_pb2.RUN_STATE_SUCCEEDED: "succeeded",
    coordinator_pb2.RUN_STATE_FAILED: "failed",
    coordinator_pb2.RUN_STATE_STOPPED: "stopped",
}


def state_name(state: int) -> str:
    return coordinator_pb2.RunState.Name(state).removeprefix("RUN_STATE_").lower()


class RunsClientError(Exception):
    """A call failed: `code` (grpc.StatusCode) and `details`, as the coordinator said (or the transport)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class RunsClient:
    """One channel to a coordinator; thread-safe. Arguments as alignd.reward_client.RewardClient's."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        tls: bool = False,
        root_certificates_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name_override: str | None = None,
        timeout: float = 60.0,
        retries: int = 5,
    ) -> None:
        self._settings = _Settings.build(
            address,
            token=token,
            token_file=token_file,
            tls=tls,
            root_certificates_file=root_certificates_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name_override=server_name_override,
            timeout=timeout,
            retries=retries,
            initial_backoff=0.5,
            max_backoff=5.0,
            max_message_bytes=4 << 20,
        )
        self._channel = self._settings.sync_channel()
        self._stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self._rng = random.Random()

    @property
    def address(self) -> str:
        return self._settings.address

    # -- calls -----------------------------------------------------------------
    def _call(self, method: str, request, *, retry: bool = True):
        """The unary call, retried on UNAVAILABLE within the deadline when `retry` (every call here is safe to
        repeat: StartRun with the same id and configuration resumes rather than duplicates)."""
        timeout = self._settings.timeout
        deadline = time.monotonic() + timeout
        failures = 0
        while True:
            try:
                return getattr(self._stub, method)(
                    request, timeout=max(0.1, deadline - time.monotonic()), metadata=self._settings.metadata
                )
            except grpc.RpcError as err:
                failures += 1
                pause = self._settings.policy.delay(failures, self._rng)  # the client's own backoff
                if (
                    not retry
                    or err.code() != grpc.StatusCode.UNAVAILABLE
                    or failures >= self._settings.policy.attempts
                    or time.monotonic() + pause >= deadline
                ):
                    raise RunsClientError(err.code(), err.details() or "") from None
                time.sleep(pause)

    def info(self) -> coordinator_pb2.GetCoordinatorInfoResponse:
        return self._call("GetCoordinatorInfo", coordinator_pb2.GetCoordinatorInfoRequest())

    def start(self, config_yaml: str, *, run_id: str = "", run_dir: str = "") -> coordinator_pb2.Run:
        """StartRun: the accepted run. Without run_id the coordinator makes one up, so a retry could start a second
        run: such a call is not retried."""
        req = coordinator_pb2.StartRunRequest(run_id=run_id, config_yaml=config_yaml, run_dir=run_dir)
        return self._call("StartRun", req, retry=bool(run_id)).run

    def get(self, run_id: str) -> coordinator_pb2.Run:
        return self._call("GetRun", coordinator_pb2.GetRunRequest(run_id=run_id)).run

    def list(self) -> list[coordinator_pb2.Run]:
        return list(self._call("ListRuns", coordinator_pb2.ListRunsRequest()).runs)

    def stop(self, run_id: str) -> coordinator_pb2.Run:
        return self._call("StopRun", coordinator_pb2.StopRunRequest(run_id=run_id)).run

    def watch(
        self,
        run_id: str,
        *,
        on_update: Callable[[coordinator_pb2.Run], None] | None = None,
        poll_seconds: float = 1.0,
        unavailable_grace_s: float = 300.0,
    ) -> coordinator_pb2.Run:
        """Polls the run until it ends, calling on_update with each state; its last state. The coordinator may be
        unreachable for up to unavailable_grace_s at a time (a pod rescheduled: it resumes the run)."""
        unavailable_since = None
        while True:
            try:
                run = self._call("GetRun", coordinator_pb2.GetRunRequest(run_id=run_id), retry=False).run
            except RunsClientError as err:
                if err.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                unavailable_since = unavailable_since or time.monotonic()
                if time.monotonic() - unavailable_since > unavailable_grace_s:
                    raise
                time.sleep(min(5.0, poll_seconds * 2))
                continue
            unavailable_since = None
            if on_update is not None:
                on_update(run)
            if run.state in TERMINAL:
                return run
            time.sleep(poll_seconds)

    def iter_files(self, run_id: str, paths: Iterable[str] = ()) -> Iterable[tuple[str, bytes]]:
        """(path, bytes) of each file GetRunFiles streams, checked against its size and SHA-256."""
        req = coordinator_pb2.GetRunFilesRequest(run_id=run_id, paths=list(paths))
        current: str | None = None
        parts: list[bytes] = []
        try:
            stream = self._stub.GetRunFiles(req, timeout=self._settings.timeout, metadata=self._settings.metadata)
            for chunk in stream:
                if chunk.path != current:
                    if current is not None:
                        raise RunsClientError(grpc.StatusCode.DATA_LOSS, f"{current}: the stream ended mid-file")
                    current, parts = chunk.path, []
                if chunk.offset != sum(len(p) for p in parts):
                    raise RunsClientError(grpc.StatusCode.DATA_LOSS, f"{chunk.path}: a chunk out of order")
                parts.append(chunk.data)
                if chunk.offset + len(chunk.data) >= chunk.size:
                    data = b"".join(parts)
                    if len(data) != chunk.size or hashlib.sha256(data).hexdigest() != chunk.sha256:
                        raise RunsClientError(grpc.StatusCode.DATA_LOSS, f"{chunk.path}: size or SHA-256 differ")
                    yield chunk.path, data
                    current = None
        except grpc.RpcError as err:
            raise RunsClientError(err.code(), err.details() or "") from None
        if current is not None:
            raise RunsClientError(grpc.StatusCode.DATA_LOSS, f"{current}: the stream ended mid-file")

    def fetch_files(self, run_id: str, out_dir: str | Path, paths: Iterable[str] = ()) -> list[Path]:
        """Writes the run's files (the report's when `paths` is empty) under out_dir, each atomically; their paths."""
        out = Path(out_dir)
        written = []
        for rel, data in self.iter_files(run_id, paths):
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or not p.parts:  # never trust a path to write to
                raise RunsClientError(grpc.StatusCode.DATA_LOSS, f"{rel!r}: not a path inside the run directory")
            target = out.joinpath(*p.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(target, data)
            written.append(target)
        return written

    # -- lifetime ----------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RunsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
