"""One OpenMP thread pool per process: a thread that ran torch work hands its pool back when done.

torch's CPU wheels run intra-op parallelism on GNU OpenMP (libgomp), which gives every thread that starts a
parallel region its own pool of worker threads, kept until that thread exits. Once the pools of a process hold
more threads than the machine has CPUs, libgomp stops spinning between parallel regions (its "throttled" spin
count, 100 iterations instead of 300,000) and every region wakes its workers through the kernel instead. Decoding
a batch of 16 runs thousands of small regions, so that costs: on 2 cores with torch_threads 2, SmolLM2's policy
generated 16 x 24 tokens in 3.6 s (2.0 cores busy) until one other thread of the process had run a parallel copy,
and in 5.9 s (1.3 cores busy) from then on; a training minibatch went from 3.8 s to 4.7 s (bench/NOTES.md,
"Where the 20 minutes go"). A role's gRPC threads (LoadWeights, TrainStep, PushWeights, jobs) are such threads:
each one that ran torch work kept a pool for the life of the process, beside the batcher's.

`release_thread_pool()` frees the calling thread's pool (OpenMP 5.0 `omp_pause_resource_all(omp_pause_soft)`,
which libgomp implements for the caller's pool only; the next parallel region of that thread makes a new one,
about a thread start). The shared server interceptor calls it after every RPC, so only the thread that computes
continuously (a role's batcher) keeps a pool. A no-op where libgomp is not loaded (no torch in the process,
another OpenMP runtime, macOS) or when ALIGND_OMP_RELEASE=0.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

_OMP_PAUSE_SOFT = 1
_lock = threading.Lock()
_pause = None  # the loaded omp_pause_resource_all, once found
_disabled = False


def _find_libgomp() -> str | None:
    """The path of the libgomp this process has mapped (torch's bundled copy), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1]
                if os.path.basename(path).startswith("libgomp") and ".so" in path:
                    return path
    except OSError:
        return None
    return None


def _load():
    global _pause, _disabled
    with _lock:
        if _pause is not None or _disabled:
            return _pause
        if os.environ.get("ALIGND_OMP_RELEASE", "1") == "0":
            _disabled = True
            return None
        path = _find_libgomp()
        if path is None:
            return None  # torch not loaded yet (or no libgomp): looked for again next time
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            _disabled = True  # a libgomp before OpenMP 5.0
            return None
        fn.argtypes = [ctypes.c_int]
        fn.restype = ctypes.c_int
        _pause = fn
        return fn


def release_thread_pool() -> bool:
    """Frees the calling thread's OpenMP worker pool, if it has one; True when libgomp accepted the call.

    Call it from a thread that ran torch work and will idle or serve other calls next, never from inside a
    parallel region. Cheap when there is nothing to free (a thread without a pool, a process without torch)."""
    if _disabled or "torch" not in sys.modules:
        return False
    fn = _pause if _pause is not None else _load()
    return fn is not None and fn(_OMP_PAUSE_SOFT) == 0
