"""Worker lanes: a sweep's or a check's jobs in several worker processes at once.

A lane runs jobs one at a time, in order: a local worker process (`pool.Worker`; on a
multi-GPU host pinned to one GPU through CUDA_VISIBLE_DEVICES) or a slot of a Ray cluster
(`ray_pool`). The caller hands an idle lane a *unit* (a short list of jobs: the built-in,
then a variant) and reads the replies back in its own thread, so every result reaches the
store through one writer (`store.append_result`, under the file's lock).

Timing lanes each time the built-in on their own device, in the same run, before their
first variant of a shape; the records say which device timed them (`timed_on`), and a
variant is ranked against the built-in of its own device (`select.latest_with_baselines`).
Two kernels are never timed on one GPU at once: a timing lane owns its device.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass


class Worker:
    """A `python -m hlh_mlx.worker` child that answers one request per line (the sweep's
    worker; here, with no MLX import, so that a Ray worker that only hands jobs to it
    stays light)."""

    def __init__(self, env: dict | None = None):
        """`env`: variables set for this worker on top of ours (a GPU pin, emulator threads)."""
        self.proc = None
        self.env = dict(env or {})
        self.replies: queue.Queue = queue.Queue()
        self.closed = False
        self._lock = threading.Lock()  # a pool's thread may be in request() while the sweep closes us

    def _start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # HLH_MLX_WORKER replaces the worker command (e.g. to run it under compute-sanitizer)
        cmd = shlex.split(env["HLH_MLX_WORKER"]) if env.get("HLH_MLX_WORKER") else [
            sys.executable, "-m", "hlh_mlx.worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.replies = queue.Queue()
        proc, q = self.proc, self.replies
        threading.Thread(target=lambda: [q.put(line) for line in proc.stdout] + [q.put(None)], daemon=True).start()
        self._stderr: deque[str] = deque(maxlen=20)  # the tail, for a crash report
        tail = self._stderr
        threading.Thread(target=lambda: [tail.append(line) for line in proc.stderr], daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def request(self, req: dict, timeout: float) -> dict:
        with self._lock:
            if self.closed:
                return {"status": "crashed", "error": "the run stopped before this job ran"}
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            proc, replies, tail = self.proc, self.replies, self._stderr
        try:
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            line = replies.get(timeout=timeout)
        except (BrokenPipeError, OSError, ValueError):  # died before it read the request
            line = None
        except queue.Empty:
            self.stop()
            return {"status": "timeout", "error": f"no result within {timeout:g} s (hang?); the worker was restarted"}
        if line is None:
            code = proc.wait()
            with self._lock:
                if self.proc is proc:
                    self.proc = None
            text = "".join(list(tail)[-5:]).strip()
            return {"status": "crashed", "error": f"the worker died (exit {code}){': ' + text[-300:] if text else ''}"}
        return json.loads(line)

    def stop(self):
        with self._lock:
            proc, self.proc = self.proc, None
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()

    def close(self):
        """Stop for good: a request still on its way gets no new process."""
        with self._lock:
            self.closed = True
        self.stop()


class PoolError(ValueError):
    """A pool that cannot be made as asked (too few GPUs, no Ray, ...): one line for the user."""


class MixedDevicesError(RuntimeError):
    """A worker timed on another kind of device than the run's: its numbers are refused."""


@dataclass
class LaneState:
    """What progress shows per worker."""
    done: int = 0
    current: str | None = None
    since: float | None = None
    restarts: int = 0


class Lane:
    """One place jobs run, one unit at a time (a subclass supplies `_run_unit`)."""

    # a timing job carries the built-in with it (Ray: a task does not own a device between
    # tasks, so each timing task times the built-in first, on its own GPU)
    bundles_builtin = False

    def __init__(self, name: str, pin: str | None = None, timed_on: str | None = None):
        self.name, self.pin, self.timed_on = name, pin, timed_on
        self.state = LaneState()
        self.outstanding = 0  # replies of the current unit not yet read by the caller
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, unit: list[tuple[object, dict]], timeout: float, outbox: queue.Queue, label: str | None):
        self.outstanding = len(unit)
        self.state.current, self.state.since = label, time.monotonic()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, args=(outbox,), daemon=True, name=f"hlh-{self.name}")
            self._thread.start()
        self._inbox.put((unit, timeout))

    def _loop(self, outbox: queue.Queue):
        while True:
            item = self._inbox.get()
            if item is None:
                return
            unit, timeout = item
            try:
                replies = self._run_unit([job for _, job in unit], timeout)
            except Exception as e:  # noqa: BLE001 (a lane that breaks loses its unit, not the run)
                replies = [{"status": "crashed", "error": f"worker {self.name} failed: {type(e).__name__}: {e}"}]
            # the unit's replies in one piece: a variant's record lands right after the
            # built-in timed with it, whatever other workers finish meanwhile
            outbox.put((self, [(tag, reply or {"status": "crashed", "error": f"worker {self.name} gave no reply"})
                               for (tag, _), reply in zip(unit, list(replies) + [None] * len(unit))]))

    def _run_unit(self, jobs: list[dict], timeout: float) -> list[dict]:
        raise NotImplementedError

    def stop(self):
        self._inbox.put(None)


class LocalLane(Lane):
    """A worker process on this host (anything with `request(job, timeout)` and `stop()`)."""

    def __init__(self, worker, name: str = "w0", pin: str | None = None, timed_on: str | None = None,
                 env: dict | None = None, owned: bool = True):
        """`owned`: the pool made the worker and closes it for good when it stops (a
        worker handed in by a caller is only stopped, and may be used again)."""
        super().__init__(name, pin, timed_on)
        self.worker, self.env, self.owned = worker, env or {}, owned

    def _run_unit(self, jobs, timeout):
        out = []
        for job in jobs:
            reply = self.worker.request(job, job.get("timeout") or timeout)
            if reply.get("status") in ("crashed", "timeout"):
                self.state.restarts += 1
            out.append(reply)
        return out

    def stop(self):
        super().stop()
        try:
            close = getattr(self.worker, "close", None) if self.owned else None
            (close or self.worker.stop)()
        except Exception:  # noqa: BLE001 (stopping is best effort: the process may be gone already)
            pass


class Pool:
    """Lanes and the one queue their replies come back on."""

    def __init__(self, lanes: list[Lane], kind: str = "local"):
        if not lanes:
            raise PoolError("a pool needs at least one worker")
        self.lanes, self.kind = lanes, kind
        self.outbox: queue.Queue = queue.Queue()
        self._ready: deque = deque()  # replies of a finished unit not yet handed out

    def __len__(self):
        return len(self.lanes)

    @property
    def parallel(self) -> bool:
        return len(self.lanes) > 1 or self.kind != "local"

    def idle(self) -> list[Lane]:
        return [lane for lane in self.lanes if lane.outstanding == 0]

    def busy(self) -> bool:
        return any(lane.outstanding for lane in self.lanes)

    def submit(self, lane: Lane, unit: list[tuple[object, dict]], timeout: float, label: str | None = None):
        assert lane.outstanding == 0, f"{lane.name} is busy"
        lane.submit(unit, timeout, self.outbox, label)

    def get(self, timeout: float | None = None):
        """The next (lane, tag, reply), or None after `timeout` seconds without one."""
        if not self._ready:
            try:
                lane, replies = self.outbox.get(timeout=timeout)
            except queue.Empty:
                return None
            self._ready.extend((lane, tag, reply) for tag, reply in replies)
        lane, tag, reply = self._ready.popleft()
        lane.outstanding -= 1
        if lane.outstanding == 0:
            lane.state.done += 1
            lane.state.current = lane.state.since = None
        return lane, tag, reply

    def wait_all(self, lane: Lane, timeout: float | None = None) -> list[tuple[object, dict]]:
        """Every reply of `lane`'s current unit (the pool must be otherwise idle)."""
        out = []
        while lane.outstanding:
            got = self.get(timeout)
            if got is not None:
                out.append(got[1:])
        return out

    def states(self, short: bool = False) -> str:
        """One line: each worker's finished jobs and what it runs now, for how long
        (`short`: counts and busy/idle only, for a progress bar)."""
        now = time.monotonic()
        if short and len(self.lanes) > 4:  # a bar's line has room for totals only
            busy = sum(lane.state.current is not None for lane in self.lanes)
            return f"{len(self.lanes)} workers, {busy} busy"
        parts = []
        for lane in self.lanes:
            s = lane.state
            name = f"{lane.name}{'@gpu' + lane.pin if lane.pin else ''}"
            busy = s.current is not None and s.since is not None
            if short:
                parts.append(f"{name}: {s.done}{' busy' if busy else ''}")
                continue
            what = f"running {s.current} ({now - s.since:.0f}s)" if busy else "idle"
            extra = f", {s.restarts} restarted" if s.restarts else ""
            parts.append(f"{name}: {s.done} done{extra}, {what}")
        return ("  " if short else "; ").join(parts)

    def stop(self):
        for lane in self.lanes:
            lane.stop()


# ---- local pools ----------------------------------------------------------------------------

def gpu_pins(n: int, count: int, visible: str | None = None) -> list[str]:
    """One distinct GPU per worker: the CUDA_VISIBLE_DEVICES value each of `n` workers gets,
    out of `count` devices (`visible`: this process's CUDA_VISIBLE_DEVICES, whose entries
    are the devices it may use, in order). More workers than GPUs is refused: two workers
    timing on one GPU would time each other's kernels."""
    if visible is not None and visible.strip():
        ids = [x.strip() for x in visible.split(",") if x.strip()][:count]
    else:
        ids = [str(i) for i in range(count)]
    if len(set(ids)) != len(ids):
        raise PoolError(f"CUDA_VISIBLE_DEVICES={visible!r} names a GPU twice")
    if n > len(ids):
        raise PoolError(f"--workers {n} needs {n} GPUs, {len(ids)} visible"
                        + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
                        + ": each timing worker owns one GPU (two on one GPU would time each other's kernels)")
    return ids[:n]


def gpu_count(backend: str) -> int:
    """GPUs this process sees (respects CUDA_VISIBLE_DEVICES)."""
    import mlx.core as mx
    if backend == "metal":
        return 1
    try:
        return int(mx.device_count(mx.gpu))
    except Exception:  # noqa: BLE001 (no GPU back end in this MLX)
        return 0


def emulator_threads(n: int) -> str:
    """Emulator threads per worker when `n` workers share this host's cores."""
    return str(max(1, (os.cpu_count() or 1) // max(1, n)))


def local(n: int, backend: str, *, worker_factory=None, count: int | None = None, visible: str | None = None,
          workers: list | None = None) -> Pool:
    """`n` worker processes on this host for `backend`. GPU back ends pin each worker to
    its own GPU (`count`, `visible`: the device count and CUDA_VISIBLE_DEVICES, read from
    this process when not given). `worker_factory(env)` makes one worker (default
    `pool.Worker`); `workers` gives them ready-made (tests)."""
    if n < 1:
        raise PoolError(f"--workers must be at least 1 (got {n})")
    if worker_factory is None:
        worker_factory = lambda env: Worker(env=env)  # noqa: E731
    envs: list[dict] = []
    pins: list[str | None] = [None] * n
    host = socket.gethostname()
    if backend == "emulator":
        # the cores are shared out: each worker's kernels run on its share
        threads = None if os.environ.get("HLH_MLX_EMU_THREADS") or n == 1 else emulator_threads(n)
        envs = [{"HLH_MLX_EMU_THREADS": threads} if threads else {} for _ in range(n)]
    elif backend == "metal":
        if n > 1:
            raise PoolError(f"--workers {n}: a Mac has one GPU, and two workers timing on it would time each other's "
                            "kernels (use --workers 1, or --ray with several Macs)")
        envs = [{}]
    else:
        if n > 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
            pins = list(gpu_pins(n, gpu_count(backend) if count is None else count, visible))
        envs = [{"CUDA_VISIBLE_DEVICES": pin} if pin is not None else {} for pin in pins]
    lanes = []
    for i in range(n):
        w = workers[i] if workers is not None else worker_factory(envs[i])
        timed_on = f"{host}/gpu{pins[i]}" if pins[i] is not None else None
        lanes.append(LocalLane(w, f"w{i}", pins[i], timed_on, envs[i], owned=workers is None))
    return Pool(lanes)


def run_unordered(pool: Pool, items: list, make_job, timeout: float, *, label=None, on_result=None,
                  rerun_crashed: bool = True):
    """Run one job per item on the pool's lanes as they become free; call
    `on_result(item, lane, reply)` as replies arrive. A job whose worker crashed is run
    once more (a worker killed from outside costs only its job's time)."""
    todo = list(enumerate(items))[::-1]
    retried: set[int] = set()
    try:
        while todo or pool.busy():
            for lane in pool.idle():
                if not todo:
                    break
                i, item = todo.pop()
                pool.submit(lane, [(i, make_job(item))], timeout, label(item) if label else None)
            got = pool.get(timeout=0.5)
            if got is None:
                continue
            lane, i, reply = got
            if rerun_crashed and reply.get("status") == "crashed" and i not in retried:
                retried.add(i)
                todo.append((i, items[i]))
                continue
            if on_result:
                on_result(items[i], lane, reply)
    finally:
        pool.stop()
