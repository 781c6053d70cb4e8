"""Sweeps and checks on a Ray cluster: `--ray [ADDRESS|auto|local]` (`pip install 'hlh_mlx[ray]'`).

The jobs are the local pool's (hlh_mlx/pool.py), run as Ray tasks with resource requests:
one GPU for a timing job (and the GPU kind the run was planned for), one CPU for an
emulator check. Each task runs its jobs in a `hlh_mlx.worker` process of its own (kept
for the next task in the same Ray worker), so a kernel that crashes costs that process,
not the Ray worker; a Ray worker that dies (a node lost, a process killed) has its task
re-run by Ray (`max_retries`). Replies come back to the coordinator, which alone writes
the store. A task does not own a GPU between tasks, so a timing task times the built-in
first, on its own GPU, and its records say which GPU (`timed_on`); a reply from another
kind of device than the run's is refused (pool.MixedDevicesError).

Every node needs MLX and hlh_mlx's dependencies; hlh_mlx itself travels with the tasks
(`runtime_env` py_modules), and each job carries its template's text.

What a run costs beyond its jobs: importing Ray and joining the cluster, a Ray worker
process per slot with its hlh_mlx worker (both started as soon as the pool is made, while
the coordinator still lists the jobs, and loading their modules meanwhile), and leaving
the cluster, which the pool does itself when it stops (left to Ray's exit hook, leaving
first sleeps half a second for log lines that `log_to_driver=False` never sends).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

from .pool import Lane, Pool, PoolError

INSTALL = "pip install 'hlh_mlx[ray]'"
# a task whose Ray worker died is run again this many times (a kernel crash does not kill it)
MAX_RETRIES = 3
# seconds a warm-up waits for a worker process to load its modules
WARM_UP_TIMEOUT = 120.0
# settings that name paths or files of the coordinator: the workers get the jobs, not these
_NOT_FORWARDED = {"HLH_MLX_VARIANTS", "HLH_MLX_TEMPLATES"}


def _ray():
    try:
        import ray
    except ImportError:
        raise PoolError(f"--ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def connect(address: str | None):
    """Join the cluster at `address` ("auto": the running one; "local": start one on this
    host; None or "": $RAY_ADDRESS or a cluster running here, else start one)."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    package = str(Path(__file__).resolve().parent)
    kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
              runtime_env={"py_modules": [package]})
    try:
        if address == "local":
            ray.init(address="local", num_cpus=os.cpu_count(), **kw)
        elif address:
            ray.init(address=address, **kw)
        else:
            ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PoolError(f"--ray {address or ''}: cannot join a Ray cluster: {str(e).splitlines()[0]}") from None
    return ray


# ---- what runs on the cluster ----------------------------------------------------------------

_WORKERS: dict = {}


def _worker(env: dict):
    """This Ray worker's hlh_mlx worker process for `env` (kept for the next task)."""
    from .pool import Worker
    key = (tuple(sorted(env.items())), os.environ.get("CUDA_VISIBLE_DEVICES"))
    w = _WORKERS.get(key)
    if w is None:  # another pin or settings: a fresh worker process (the old one stops)
        for old in _WORKERS.values():
            old.close()
        _WORKERS.clear()
        w = _WORKERS[key] = Worker(env=env)
    return w


def _localize(job: dict, texts: dict) -> tuple[dict, tuple[str, str] | None]:
    """The job with its template at a path on this node holding the coordinator's text."""
    src = job.get("template")
    if not src or src not in texts:
        return job, None
    text = texts[src]
    try:
        if Path(src).read_text() == text:
            return job, None
    except OSError:
        pass
    p = Path(src)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    here = Path(tempfile.gettempdir()) / "hlh_mlx_ray_templates" / digest / p.parent.name / p.name
    if not here.exists():
        here.parent.mkdir(parents=True, exist_ok=True)
        tmp = here.with_name(f".{here.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, here)
    return dict(job, template=str(here)), (str(here), src)


def run_unit(jobs: list[dict], timeout: float, env: dict, texts: dict) -> dict:
    """(a Ray task) Run `jobs` in order in this Ray worker's hlh_mlx worker process
    (no jobs: only start that process, a warm-up)."""
    import ray

    w = _worker(env)
    if not jobs:  # held until the process has loaded its modules, so that each slot's
        # warm-up gets a Ray worker of its own (a finished one would be handed the next)
        return {"replies": [w.request({"kind": "ping"}, timeout)], "timed_on": None}
    replies = []
    for job in jobs:
        job, moved = _localize(job, texts)
        reply = w.request(job, job.get("timeout") or timeout)
        if moved and isinstance(reply.get("error"), str):
            reply["error"] = reply["error"].replace(*moved)
        replies.append(reply)
    gpus = ray.get_gpu_ids()
    timed_on = f"{ray.util.get_node_ip_address()}/gpu{','.join(map(str, gpus))}" if gpus else None
    return {"replies": replies, "timed_on": timed_on}


def probe(backend: str) -> dict:
    """(a Ray task) The back end and device a task of this kind gets, and the node's GPU kind."""
    import dataclasses

    import ray

    from . import backends
    be = backends.resolve(backend)
    node = next((n for n in ray.nodes() if n.get("NodeID") == ray.get_runtime_context().get_node_id()), {})
    kinds = sorted(k for k in node.get("Resources", {}) if k.startswith("accelerator_type:"))
    return {"device": dataclasses.asdict(backends.device(be)), "accelerator": kinds[0] if kinds else None}


# ---- the coordinator's side -----------------------------------------------------------------

class RayLane(Lane):
    """A slot of the cluster: one task at a time, wherever Ray places it."""

    def __init__(self, name: str, fn, options: dict, env: dict, timing: bool):
        super().__init__(name)
        self.fn, self.options, self.env = fn, options, env
        self.bundles_builtin = timing
        self._ref = None
        self._warm = None

    def warm_up(self):
        """Start a Ray worker and its hlh_mlx worker for this slot now (not waited for):
        the first job finds them running."""
        self._warm = self.fn.options(**self.options).remote([], WARM_UP_TIMEOUT, self.env, {})

    def _run_unit(self, jobs, timeout):
        ray = _ray()
        texts = {}
        for job in jobs:
            if job.get("template") and job["template"] not in texts:
                texts[job["template"]] = Path(job["template"]).read_text()
        self._ref = self.fn.options(**self.options).remote(jobs, timeout, self.env, texts)
        try:
            out = ray.get(self._ref)
        except ray.exceptions.RayError as e:  # retries spent, or cancelled
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return [{"status": "crashed", "error": f"the Ray task failed ({type(e).__name__}): {first[:300]}"}
                    for _ in jobs]
        finally:
            self._ref = None
        replies = out["replies"]
        for r in replies:
            if out.get("timed_on"):
                r.setdefault("timed_on", out["timed_on"])
        return replies

    def stop(self):
        super().stop()
        for ref in (self._ref, self._warm):
            if ref is not None:
                try:
                    _ray().cancel(ref, force=True)
                except Exception:  # noqa: BLE001 (best effort: it may have finished)
                    pass

    def join(self, timeout: float) -> bool:
        """Wait for this slot's thread to finish its unit; whether it did."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return t is None or not t.is_alive()


class RayPool(Pool):
    """The slots of a cluster; a cluster the pool joined itself it leaves when it stops."""

    def __init__(self, lanes: list[RayLane], owns_connection: bool = False):
        super().__init__(lanes, kind="ray")
        self.owns_connection = owns_connection

    def stop(self):
        super().stop()
        if not self.owns_connection:  # joined by the caller (its own ray.init): theirs to leave
            return
        self.owns_connection = False
        # once no slot is inside a Ray call (a stopped task returns at once); a slot stuck
        # there leaves it to Ray's exit hook
        if all(lane.join(10.0) for lane in self.lanes):
            try:
                _ray().shutdown()
            except Exception:  # noqa: BLE001 (best effort: the exit hook tries again)
                pass


def forwarded_env() -> dict:
    """The HLH_MLX_* settings a worker on the cluster runs with (not the coordinator's paths)."""
    return {k: v for k, v in os.environ.items() if k.startswith("HLH_MLX_") and k not in _NOT_FORWARDED}


def make(address: str | None, backend: str, workers: int | None = None) -> tuple[Pool, object]:
    """A pool of Ray slots for `backend` and the device the cluster gives it (a
    `backends.Device`): timing jobs ask for one GPU of that kind each, emulator checks one
    CPU. `workers`: how many tasks at once (default: the cluster's GPUs, or CPUs)."""
    from . import backends
    owns = not _ray().is_initialized()
    ray = connect(address)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    wants_gpu = backend in ("cuda", "metal") or (backend == "auto" and gpus > 0)
    if wants_gpu and gpus == 0:
        raise PoolError(f"--ray --backend {backend}: the cluster has no GPU (resources: {cpus} CPUs)")
    req = {"num_gpus": 1} if wants_gpu else {"num_cpus": 1}
    if wants_gpu:  # which GPU the cluster gives a task (the coordinator may have none)
        try:
            info = ray.get(ray.remote(probe).options(**req, max_retries=MAX_RETRIES).remote(backend))
        except ray.exceptions.RayError as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise PoolError(f"--ray: the cluster cannot run hlh_mlx's jobs: {msg[:300]}") from None
    else:  # the emulator is the same everywhere: nothing to ask
        info = {"device": dataclasses.asdict(backends.device("emulator")), "accelerator": None}
    device = backends.Device(**info["device"])
    timing = device.can_time
    options = dict(req, max_retries=MAX_RETRIES)
    if timing and info.get("accelerator"):  # only GPUs of the kind the run is ranked on
        options["resources"] = {info["accelerator"]: 0.001}
    env = forwarded_env()
    if not timing and "HLH_MLX_EMU_THREADS" not in env:
        env["HLH_MLX_EMU_THREADS"] = "1"  # a task holds one CPU
    n = workers or max(1, gpus if timing else cpus)
    fn = ray.remote(run_unit)
    lanes = [RayLane(f"r{i}", fn, options, env, timing) for i in range(n)]
    if not timing:  # (a timing task's GPU is Ray's pick: a worker started now may be pinned to another)
        for lane in lanes:
            lane.warm_up()
    return RayPool(lanes, owns_connection=owns), device

