"""How fast each model prefills on this machine, and the choice
`method="auto"` makes from it.

A prefill of n tokens after p cached ones costs a·n + b·n·(p + n/2)
seconds: the weights' share grows with the tokens, attention's with the
tokens times the keys each one reads. A model's a and b are fitted to a
calibration measured once per model file and engine setting (threads, flash
attention, batch sizes, layers offloaded, llama.cpp version) and to the
stage times of every call since, so that the predictions follow the lengths
this machine actually sees. The measurements live in the cache folder
(speeds.json) and are shared by every session.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ._log import logger as log
from .registry import cache_dir

CAL_CHUNK = 256        # tokens per timed chunk of the calibration prefill
CAL_CHUNKS = 4         # timed chunks (one more, untimed, warms the weights up)
CAL_STEPS = 4          # timed single-token decode steps after it
KEEP_OBSERVED = 32     # the newest measurements of real calls kept per model
BOOK_VERSION = 1
BOOK_ENV = "PYSPEC_GGUF_SPEEDS"  # the file's path, where not the cache folder's speeds.json


@dataclass
class ModelSpeed:
    """One model's measurements under one engine setting.

    prefill: [n, p, seconds] of prefills (n tokens after p cached);
    steps: [p, seconds] of single decode steps after p tokens;
    lookahead: [steps, n, seconds] of the draft's observed lookaheads;
    observed: how many of `prefill` came from real calls (the newest ones).
    """

    prefill: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    lookahead: list = field(default_factory=list)
    observed: int = 0
    calibration_s: float = 0.0

    def coefficients(self) -> tuple:
        """(a, b) fitted by least squares on relative errors, b >= 0."""
        rows = np.array(self.prefill, dtype=np.float64).reshape(-1, 3)
        n, p, t = rows[:, 0], rows[:, 1], rows[:, 2]
        x = np.stack([n, n * (p + n / 2)], axis=1) / t[:, None]
        ones = np.ones(len(t))
        (a, b), *_ = np.linalg.lstsq(x, ones, rcond=None)
        if b < 0 or a <= 0:  # within noise of no attention cost: fit the weights' share alone
            a, b = float(np.sum(n / t) / np.sum((n / t) ** 2)), 0.0
        return float(a), float(b)

    def prefill_s(self, n: int, p: int = 0) -> float:
        """Predicted seconds to prefill n tokens after p cached ones."""
        if n <= 0:
            return 0.0
        a, b = self.coefficients()
        return a * n + b * n * (p + n / 2)

    def lookahead_s(self, k: int, n: int) -> float:
        """Predicted seconds of k drafted steps after an n-token prompt: the
        calibration's decode step, its attention grown to n keys, scaled by
        what observed lookaheads (their capture included) cost against that."""
        if k <= 1 or not self.steps:
            return 0.0
        _, b = self.coefficients()
        p0, step = np.median(np.array(self.steps, dtype=np.float64), axis=0)
        per_step = step + b * max(0.0, n - p0)
        seen = [t / ((s - 1) * (step + b * max(0.0, m - p0))) for s, m, t in self.lookahead if s > 1]
        return (k - 1) * per_step * (float(np.median(seen)) if seen else 1.0)

    def observe_prefill(self, n: int, p: int, seconds: float) -> None:
        if n > 0 and seconds > 0:
            self.prefill.append([int(n), int(p), float(seconds)])
            self.observed += 1
            if self.observed > KEEP_OBSERVED:
                del self.prefill[len(self.prefill) - self.observed]
                self.observed -= 1

    def observe_lookahead(self, k: int, n: int, seconds: float) -> None:
        if k > 1 and seconds > 0:
            self.lookahead = (self.lookahead + [[int(k), int(n), float(seconds)]])[-KEEP_OBSERVED:]


def calibrate(model, options: dict, progress: Optional[Callable[[int, int], None]] = None) -> ModelSpeed:
    """Time `model`'s prefill chunk by chunk over CAL_CHUNKS·CAL_CHUNK
    tokens (after one untimed chunk that brings its weights into memory),
    then CAL_STEPS single decode steps. Token values do not change the cost."""
    t_start = time.perf_counter()
    n = CAL_CHUNK * CAL_CHUNKS
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.n_vocab, size=n + CAL_CHUNK + CAL_STEPS).astype(np.int32)
    speed = ModelSpeed()
    with model.context(n_ctx=n + CAL_CHUNK + CAL_STEPS, n_batch=CAL_CHUNK, n_ubatch=CAL_CHUNK,
                       n_threads=options["n_threads"], flash_attn=options["flash_attn"]) as ctx:
        ctx.prefill(tokens[:CAL_CHUNK], want="none")
        ctx.seq_rm(0, -1, -1)
        marks = [time.perf_counter()]

        def timed(done: int, total: int) -> None:
            marks.append(time.perf_counter())
            if progress is not None:
                progress(done, total + CAL_STEPS)

        ctx.prefill(tokens[CAL_CHUNK:CAL_CHUNK + n], want="none", progress=timed)
        speed.prefill = [[CAL_CHUNK, i * CAL_CHUNK, marks[i + 1] - marks[i]] for i in range(CAL_CHUNKS)]
        for i in range(CAL_STEPS):
            t0 = time.perf_counter()
            ctx.prefill(tokens[CAL_CHUNK + n + i:CAL_CHUNK + n + i + 1], want="last")
            speed.steps.append([n + i, time.perf_counter() - t0])
            if progress is not None:
                progress(n + i + 1, n + CAL_STEPS)
    speed.calibration_s = time.perf_counter() - t_start
    return speed


def speed_key(model, options: dict, n_gpu_layers: int) -> str:
    """What a model's speed depends on: its file (name, size, time), the
    engine setting and llama.cpp's version."""
    import llama_cpp
    stat = os.stat(model.path)
    return (f"{model.name}|{stat.st_size}|{stat.st_mtime_ns}|threads={options['n_threads']}"
            f"|flash={options['flash_attn']}|batch={options['n_batch']}/{options['n_ubatch']}"
            f"|gpu_layers={n_gpu_layers}|llama_cpp={llama_cpp.__version__}")


class SpeedBook:
    """Every model's measurements, kept in one JSON file (written whole, by
    replacement, so a reader never sees half of it)."""

    def __init__(self, path: Optional[Path] = None):
        self.path = Path(path or os.environ.get(BOOK_ENV) or cache_dir() / "speeds.json").expanduser()
        self._lock = threading.Lock()
        self._models: dict = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == BOOK_VERSION:
                self._models = {k: ModelSpeed(**v) for k, v in data["models"].items()}
        except FileNotFoundError:
            pass
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("ignoring unreadable speed measurements in %s (%s); measuring again", self.path, e)

    def get(self, key: str) -> Optional[ModelSpeed]:
        with self._lock:
            return self._models.get(key)

    def put(self, key: str, speed: ModelSpeed) -> None:
        with self._lock:
            self._models[key] = speed
            self._save()

    def update(self, changes: dict) -> None:
        """Apply each {key: change(ModelSpeed)} to the models measured
        already (the others stay unmeasured), then save once."""
        with self._lock:
            measured = [(self._models[key], change) for key, change in changes.items() if key in self._models]
            for speed, change in measured:
                change(speed)
            if measured:
                self._save()

    def _save(self) -> None:
        data = {"version": BOOK_VERSION, "models": {k: vars(v) for k, v in self._models.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache costs the refinement, not the answer
            log.warning("could not save speed measurements to %s (%s)", self.path, e)


@dataclass
class Choice:
    """What `auto` chose for one prompt, and why: the predicted time to
    first token of each way (empty where no prediction was needed), and the
    seconds spent calibrating for it (once per model and setting)."""

    method: str
    predicted: dict = field(default_factory=dict)
    reason: str = ""
    calibration_s: float = 0.0

    def describe(self) -> str:
        """Why, in a few words, e.g. "auto: predicted full 80.1 s, specpc 57.0 s"."""
        why = self.reason or "predicted " + ", ".join(f"{name} {s:.1f} s" for name, s in self.predicted.items())
        if self.calibration_s:
            why += f"; this machine's speed measured in {self.calibration_s:.1f} s, once"
        return f"auto: {why}"
