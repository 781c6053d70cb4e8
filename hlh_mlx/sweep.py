"""The sweep: template -> variants -> check -> time -> rank -> store.

One worker process (worker.py) does the GPU work; this module decides what to run,
records each result the moment it arrives, and restarts the worker when a variant
crashes it or runs past the per-variant timeout. The built-in is timed by the same
worker, the same way, in the same run; the timed callable of a variant is only ever
its compiled kernel.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

import mlx.core as mx

from . import __version__, backends, ops, store, templates, timing, variants
from .variants import Variant

DEFAULT_EMULATOR_BUDGET = 16
# A GPU-sized shape on the emulator runs for minutes and proves nothing a small one does not
# (a 4096^3 matmul ran 245 s and timed out blaming the kernels).
EMULATOR_MAX_BYTES = 64 * 2**20


class Worker:
    """A `python -m hlh_mlx.worker` child that answers one request per line."""

    def __init__(self):
        self.proc = None
        self.replies: queue.Queue = queue.Queue()

    def _start(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # HLH_MLX_WORKER replaces the worker command (e.g. to run it under compute-sanitizer)
        cmd = shlex.split(os.environ["HLH_MLX_WORKER"]) if os.environ.get("HLH_MLX_WORKER") else [
            sys.executable, "-m", "hlh_mlx.worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.replies = queue.Queue()
        proc, q = self.proc, self.replies
        threading.Thread(target=lambda: [q.put(line) for line in proc.stdout] + [q.put(None)], daemon=True).start()
        self._stderr: deque[str] = deque(maxlen=20)  # the tail, for a crash report
        threading.Thread(target=lambda: [self._stderr.append(line) for line in proc.stderr], daemon=True).start()

    def request(self, req: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.stop()
            return {"status": "timeout", "error": f"no result within {timeout:g} s (hang?); the worker was restarted"}
        if line is None:
            code = self.proc.wait()
            tail = "".join(list(self._stderr)[-5:]).strip()
            self.proc = None
            return {"status": "crashed", "error": f"the worker died (exit {code}){': ' + tail[-300:] if tail else ''}"}
        return json.loads(line)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@dataclass
class Plan:
    op: ops.OpSpec
    backend: str
    device: backends.Device
    shapes: list[dict]
    dtypes: list[str]
    candidates: list[Variant]
    space: list[Variant]       # every valid variant of the plan's templates
    budget: int | None
    seed: int
    timeout: float
    notes: list[str] = field(default_factory=list)
    retime: bool = False       # time the built-in and the stored winner again even if nothing is new
    retry_failed: bool = False  # run again every stored failure (not only environmental ones)
    force: bool = False         # run everything again, stored results or not


def plan(op_name: str, *, shapes=None, dtypes=None, backend="auto", budget=None, seed=0, timeout=600.0,
         template=None, retime=False, retry_failed=False, force=False, picks=None) -> Plan:
    """What to run. `picks`: parameter dicts of variants of `template` to run first (e.g.
    the ones its author expects to win); the budget beyond them goes to their neighbours."""
    op = ops.get(op_name)
    be = backends.resolve(backend)
    dev = backends.device(be)
    tbackend = backends.TEMPLATE_BACKEND[be]
    temps = [t for t in templates.discover(op.name) if t.backend == tbackend]
    if template:
        temps = [t for t in temps if t.family == template or t.name == template]
        other = [t for t in templates.discover(op.name) if template in (t.family, t.name)]
        if not temps and other:
            raise ValueError(backends.wrong_backend(other[0].name, other[0].backend, be))
        if not temps:
            known = ", ".join(t.name for t in templates.discover(op.name)) or "none"
            raise ValueError(f"unknown template {template!r} for {op.name} (known: {known})")
    if not temps:
        raise ValueError(f"no {tbackend} templates for op {op.name!r}")
    space = [v for t in temps for v in variants.expand(t)]
    if not space:
        raise ValueError(f"the {op.name} space has no valid variant for {tbackend}")
    notes = []
    if budget is None and be == "emulator" and len(space) > DEFAULT_EMULATOR_BUDGET:
        budget = DEFAULT_EMULATOR_BUDGET
        notes.append(f"emulator: checking a seeded sample of {budget} of {len(space)} variants "
                     "(--budget N for more)")
    shapes = shapes or (op.emulator_shapes if be == "emulator" else op.shapes)
    for s in shapes:
        op.check_shape(s)
        if be == "emulator" and op.bytes(s, 4) > EMULATOR_MAX_BYTES:
            raise ValueError(f"[{op.name}] shape {op.shape_str(s)} moves {op.bytes(s, 4) / 2**20:.0f} MB: the emulator "
                             f"runs every GPU thread on the CPU and checks correctness, it times nothing; check "
                             f"small shapes here (default {', '.join(op.shape_str(e) for e in op.emulator_shapes)}) "
                             f"and time GPU-sized ones on a GPU")
    dtypes = dtypes or ["float32"]
    for d in dtypes:
        if d not in op.dtypes:
            raise ValueError(f"[{op.name}] unsupported dtype {d!r} (one of {', '.join(op.dtypes)})")
    if picks:
        if len(temps) != 1:
            raise ValueError("picked variants need one --template")
        picked = [variants.make(temps[0], p) for p in picks]
        budget = max(budget or 0, len(picked))
        return Plan(op, be, dev, shapes, dtypes, picked, space, budget, seed, timeout, notes, retime,
                    retry_failed, force)
    # spread the first sample over the templates, so each family is represented
    first = budget if budget is None or not dev.can_time else max(1, budget // 2)
    picked = _round_robin([[v for v in space if v.template is t] for t in temps], first, seed)
    return Plan(op, be, dev, shapes, dtypes, picked, space, budget, seed, timeout, notes, retime,
                retry_failed, force)


def _round_robin(groups: list[list[Variant]], n: int | None, seed: int) -> list[Variant]:
    import random
    rng = random.Random(seed)
    shuffled = [rng.sample(g, len(g)) for g in groups]
    out: list[Variant] = []
    while any(shuffled) and (n is None or len(out) < n):
        for g in shuffled:
            if g and (n is None or len(out) < n):
                out.append(g.pop())
    return out


def _record(plan: Plan, shape, dtype, reply: dict, variant: Variant | None) -> dict:
    rec = {
        "op": plan.op.name, "device": plan.device.slug, "device_name": plan.device.name,
        "architecture": plan.device.architecture, "backend": plan.backend, "mlx": mx.__version__,
        "hlh_mlx": __version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shape": shape, "shape_str": plan.op.shape_str(shape), "dtype": dtype,
        "status": reply.get("status"), "error": reply.get("error"), "timing": reply.get("timing"),
        "checks": reply.get("checks"), "source": "local", "timing_method": timing.METHOD,
    }
    if variant is None:
        rec.update(variant_id=None, template="builtin", params={}, correct=True)
    else:
        rec.update(variant_id=variant.id, template=variant.template.relpath, family=variant.template.family,
                   params=variant.param_dict, source_hash=reply.get("source_hash", variant.source_hash),
                   correct=reply.get("status") == "ok", seed=reply.get("seed"))
    return rec


def _key(p: Plan, v: Variant | None, shape, dtype, repeat: bool = False) -> tuple:
    return store.result_key({
        "variant_id": v.id if v else None, "template": v.template.relpath if v else "builtin",
        "backend": p.backend, "shape_str": p.op.shape_str(shape), "dtype": dtype, "mlx": mx.__version__,
        "timing_method": timing.METHOD, "repeat": repeat})


def _redo_mode(p: Plan) -> str:
    """Which stored records this run does not count as done (store.to_redo): environmental
    failures by default, every failure with --retry-failed, everything with --force."""
    return "all" if p.force else "failed" if p.retry_failed else "environment"


def run(p: Plan, *, progress=None, worker: Worker | None = None, notify=None) -> list[dict]:
    """Run the plan; return every record of this (device, op) for the planned shapes and dtypes.

    Concurrent sweeps of one op share the work: each variant is claimed in the store before
    it runs; a variant claimed by another live sweep is left to it (and waited for at the
    end of its shape), one whose claimant died is run here."""
    path = store.path_for(p.device.slug, p.op.name)
    stale = {json.dumps(r, sort_keys=True) for r in store.to_redo(store.read(path), _redo_mode(p))}

    def is_done(r):  # a record written before this run that it redoes does not count
        return json.dumps(r, sort_keys=True) not in stale

    done = {store.result_key(r) for r in store.read(path) if is_done(r)}
    worker = worker or Worker()
    timed = p.device.can_time
    stale_after = 2 * p.timeout + 60
    try:
        for dtype in p.dtypes:
            for shape in p.shapes:
                # The built-in is timed in every run that times anything for this shape,
                # before the first variant, so new variants are ranked against a built-in
                # measured on the same machine in the same run (a resumed sweep may run on
                # another machine, days later).
                builtin_timed = False

                def run_job(v):
                    job = _job(p, v, shape, dtype)
                    reply = worker.request(job, p.timeout)
                    reply.setdefault("seed", job.get("seed"))
                    store.append_result(path, _record(p, shape, dtype, reply, v), _key(p, v, shape, dtype))
                    done.add(_key(p, v, shape, dtype))

                def take(v) -> str:
                    """"mine" (run it), "done" (by another sweep) or "claimed" (running elsewhere)."""
                    state = store.claim(path, _key(p, v, shape, dtype), is_done, stale_after)
                    if state == "done":
                        done.add(_key(p, v, shape, dtype))
                    return state

                def run_variant(v):
                    nonlocal builtin_timed
                    if timed and not builtin_timed:
                        run_job(None)
                        builtin_timed = True
                    run_job(v)

                if timed and (p.retime or _key(p, None, shape, dtype) not in done):
                    run_job(None)
                    builtin_timed = True
                if progress and timed:
                    progress(None, shape, dtype)
                jobs = list(p.candidates)
                forced = set()
                if timed and p.retime:  # the stored winners are timed again next to the built-in
                    for best in reversed(_stored_winners(p, path, shape, dtype)[:2]):
                        jobs.insert(0, best)
                        forced.add(best.id)
                seen: set[str] = set()
                deferred: list[Variant] = []
                i = 0
                while i < len(jobs):
                    v = jobs[i]
                    i += 1
                    runnable = v.id not in seen and v.supports(shape, dtype)
                    seen.add(v.id)
                    if runnable and v.id in forced:
                        run_variant(v)
                    elif runnable and _key(p, v, shape, dtype) not in done:
                        state = take(v)
                        if state == "mine":
                            run_variant(v)
                        elif state == "claimed":
                            deferred.append(v)
                    if progress:
                        progress(v, shape, dtype)
                    # once the first sample is in, add neighbours of the best few
                    if timed and p.budget is not None and i == len(jobs) and len(seen) < p.budget:
                        jobs += _refinements(p, path, shape, dtype, seen)
                # variants another sweep is running: wait for its results; run any whose
                # claimant died
                if deferred and notify:
                    notify(f"waiting for {len(deferred)} variant(s) another sweep of {p.op.name} is running "
                           f"(claims in {path}.claims)")
                while deferred:
                    waiting = []
                    for v in deferred:
                        state = take(v)
                        if state == "mine":
                            run_variant(v)
                        elif state == "claimed":
                            waiting.append(v)
                    deferred = waiting
                    if deferred:
                        time.sleep(0.25)
                if builtin_timed:
                    _time_again(p, path, shape, dtype, worker)
    finally:
        worker.stop()
        store.release(path)
    # the current renderings of the plan's templates only: records of older versions of a
    # template (another source, another id) stay in the file but are not ranked
    ids = {v.id for v in p.space} | {None}
    return [r for r in _local(path) if r.get("dtype") in p.dtypes and r.get("shape") in p.shapes
            and r.get("variant_id") in ids]


def _local(path) -> list[dict]:
    """This machine's own records: a pulled pack's results share the file but are never
    ranked, refined from or retimed as the user's own."""
    return [r for r in store.read(path) if r.get("source", "local") == "local"]


def _stored_best(p: Plan, path, shape, dtype) -> Variant | None:
    """The fastest correct stored variant of the plan's space at this shape and dtype."""
    return next(iter(_stored_winners(p, path, shape, dtype)), None)


def _stored_winners(p: Plan, path, shape, dtype) -> list[Variant]:
    """The winner of each timing method's results, newest method first: after a change of
    timing method, --retime must time the old winner again too, not only whatever the new
    method has timed so far."""
    from .rank import ranked
    by_id = {v.id: v for v in p.space}
    mine = [r for r in _local(path) if r.get("template") != "builtin" and r.get("timing")]
    out: list[Variant] = []
    for method in sorted({r.get("timing_method", 1) for r in mine}, reverse=True):
        rows = ranked([r for r in mine if r.get("timing_method", 1) == method], shape, dtype, p.backend)
        best = next((by_id[r["variant_id"]] for r in rows if r.get("variant_id") in by_id), None)
        if best is not None and best not in out:
            out.append(best)
    return out


def _time_again(p: Plan, path, shape, dtype, worker: Worker) -> None:
    """Time the winner and the built-in a second time, after everything else in this run:
    the report shows how far two timings of one kernel in one run drift apart."""
    best = _stored_best(p, path, shape, dtype)
    for v in ([None] + ([best] if best else [])):
        job = dict(_job(p, v, shape, dtype), repeat=True)
        rec = _record(p, shape, dtype, worker.request(job, p.timeout), v)
        rec.update(repeat=True, correct=False)  # never ranked or used: it only checks the first timing
        store.append(path, rec)


def _job(p: Plan, v: Variant | None, shape, dtype) -> dict:
    if v is None:
        return {"kind": "builtin", "op": p.op.name, "dtype": dtype, "time_shape": shape}
    checks = list(p.op.edge_shapes) + [shape]
    return {"kind": "variant", "op": p.op.name, "backend": p.backend, "dtype": dtype,
            "template": str(v.template.path), "params": v.param_dict, "check_shapes": checks,
            "time_shape": shape, "time": p.device.can_time, "seed": secrets.randbits(32)}


def _refinements(p: Plan, path, shape, dtype, seen) -> list[Variant]:
    from .rank import ranked
    by_id = {v.id: v for v in p.space}
    rows = ranked(_local(path), shape, dtype, p.backend)
    out = []
    for r in rows[:3]:
        best = by_id.get(r.get("variant_id"))
        if best:
            out += [n for n in variants.neighbours(best, p.space) if n.id not in seen]
    return out[: max(0, p.budget - len(seen))]
