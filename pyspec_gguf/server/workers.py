"""Requests queued for a fixed number of worker threads, each with its own
prefix caches over the loaded draft/target pair.

A request becomes a `Job`: a function run on a worker thread, which sends
events back to the asyncio side ("ready" once the call is validated, "text"
pieces, "done" with the result, or "error"). The queue is bounded:
`submit` refuses a job when it is full (the server answers 503). `cancel`
stops a job's passes or decoding at their next step and gives back its
contexts; the prefix caches stay.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .._log import logger as log
from ..pipeline import Caches
from ..prefix import PrefixPool
from ..session import Cancelled, SpecSession


class QueueFull(Exception):
    """Every worker is busy and the queue holds as many jobs as it may."""


class Job:
    """One request's work and the events it sends back to the event loop."""

    def __init__(self, work: Callable[["Worker", "Job"], None], loop: asyncio.AbstractEventLoop):
        self.work, self._loop = work, loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stream = None  # the running Stream, for cancel
        self.submitted = time.perf_counter()
        self.queued_s = 0.0

    def post(self, kind: str, value=None) -> None:
        """From the worker thread: an event for the request's handler."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: the server is shutting down
            self.cancel()

    async def next(self) -> tuple:
        return await self._events.get()

    def cancel(self) -> None:
        """From the event loop: the client went away."""
        self.cancelled.set()
        stream = self.stream
        if stream is not None:
            stream.cancel()

    def attach(self, stream) -> None:
        """From the worker: the Stream now running (cancelled at once if the
        client left meanwhile)."""
        self.stream = stream
        if self.cancelled.is_set():
            stream.cancel()


@dataclass
class Counts:
    served: int = 0
    failed: int = 0       # answered with an error
    cancelled: int = 0    # the client went away
    rejected: int = 0     # the queue was full
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


class Worker:
    """A thread that runs jobs one at a time."""

    def __init__(self, pool: "WorkerPool", index: int):
        self.pool, self.session = pool, pool.session
        self.job: Optional[Job] = None  # the job running now
        self._taken: list = []
        self.thread = threading.Thread(target=self._loop, name=f"pyspec-worker-{index}", daemon=True)
        self.thread.start()

    def cached(self, tokens: np.ndarray) -> tuple:
        """(draft, target): the prompt tokens the pools' free caches hold
        (`pipeline.Caches`)."""
        return tuple(pool.cached_tokens(tokens) if pool else 0
                     for pool in (self.pool.draft_cache, self.pool.target_cache))

    def caches(self, tokens: np.ndarray, method) -> Caches:
        """The prefix caches a prompt's passes reuse, the job's until it
        ends: the draft's for a method that drafts, the target's for one
        whose target reads the whole prompt."""
        pool = self.pool
        draft = pool.draft_cache.take(tokens) if pool.draft_cache and method.uses_draft else None
        target = pool.target_cache.take(tokens) if pool.target_cache and method.target_reads_prompt else None
        self._taken += [(pool.draft_cache, draft), (pool.target_cache, target)]
        return Caches(draft=draft, target=target)

    def _give_back(self) -> None:
        for caches, cache in self._taken:
            if caches is not None:
                caches.give_back(cache)
        self._taken.clear()

    def _loop(self) -> None:
        counts = self.pool.counts
        while True:
            job = self.pool.queue.get()
            if job is None:
                break
            job.queued_s = time.perf_counter() - job.submitted
            if job.cancelled.is_set():
                counts.add("cancelled")
                continue
            counts.add("running")
            self.job = job
            try:
                job.work(self, job)
                counts.add("served")
            except Cancelled:
                counts.add("cancelled")
                job.post("error", Cancelled("cancelled"))
            except Exception as e:  # the worker lives on; the request gets its error
                if not isinstance(e, ValueError):
                    log.exception("a request failed")
                counts.add("failed")
                job.post("error", e)
            finally:
                counts.add("running", -1)
                self.job = job.stream = None
                self._give_back()


class WorkerPool:
    """`workers` threads over one loaded pair, fed by a queue of at most
    `queue_size` waiting jobs; the KV of the last `cache_slots` prompts of
    each model is kept for the requests that follow (0: none), shared by the
    workers so that a conversation finds its prefix whichever answers it;
    with a `store` (`store.StateStore`) the draft's outlive the process."""

    def __init__(self, session: SpecSession, workers: int = 1, queue_size: int = 32, cache_slots: int = 2,
                 store=None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, not {queue_size}")
        if cache_slots < 0:
            raise ValueError(f"cache_slots must be >= 0, not {cache_slots}")
        self.session, self.queue_size = session, queue_size
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.counts = Counts()
        options = session.context_options
        self.draft_cache = (PrefixPool(session.draft, options, cache_slots, store=store)
                            if cache_slots and session.draft is not None else None)
        self.target_cache = PrefixPool(session.target, options, cache_slots) if cache_slots else None
        self.workers = [Worker(self, i) for i in range(workers)]

    def submit(self, job: Job) -> Job:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.counts.add("rejected")
            raise QueueFull(f"the server is busy: {self.queue_size} requests are waiting") from None
        return job

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the workers: waiting jobs are dropped, running ones cancelled."""
        while True:
            try:
                self.queue.get_nowait().cancel()
            except queue.Empty:
                break
            except AttributeError:  # a stop already queued
                pass
        for worker in self.workers:
            if worker.job is not None:
                worker.job.cancel()
        for _ in self.workers:
            self.queue.put(None)
        for worker in self.workers:
            worker.thread.join(timeout)
        if not any(w.thread.is_alive() for w in self.workers):
            for caches in (self.draft_cache, self.target_cache):
                if caches is not None:
                    caches.close()
