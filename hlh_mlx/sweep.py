"""The sweep: template -> variants -> check -> time -> rank -> store.

One worker process (worker.py) does the GPU work; this module decides what to run,
records each result the moment it arrives, and restarts the worker when a variant
crashes it or runs past the per-variant timeout. The built-in is timed by the same
worker, the same way, in the same run; the timed callable of a variant is only ever
its compiled kernel.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

import mlx.core as mx

from . import __version__, backends, ops, store, templates, timing, variants
from .pool import Worker  # noqa: F401  (the worker process; it lives in pool, which a Ray worker imports)
from .variants import Variant

DEFAULT_EMULATOR_BUDGET = 16
# The built-in's limit per timing, whatever the variants' is: MLX compiles some built-ins
# on their first call in a process (its CUDA quantized matmul for several rows ran past a
# device sweep's 60 s), and a built-in without a timing leaves its run's variants nothing
# to be ranked against.
BUILTIN_TIMEOUT = 600.0
# A GPU-sized shape on the emulator runs for minutes and proves nothing a small one does not
# (a 4096^3 matmul ran 245 s and timed out blaming the kernels).
EMULATOR_MAX_BYTES = 64 * 2**20


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
    sample: int | None = None   # variants every shape starts with (None: the candidates as given)

    def first_sample(self, shape, dtype) -> list[Variant]:
        """The variants a shape starts with: the candidates that run at it, topped up (same
        seed, spread over the templates) with others of the space that do, where fewer than
        `sample` of them do: a requirement that rules out every candidate at one shape of
        several (K too short for the split, say) must not leave that shape with none."""
        fit = [v for v in self.candidates if v.supports(shape, dtype)]
        if self.sample is None or len(fit) >= self.sample:
            return fit
        taken = {v.id for v in fit}
        groups = {}
        for v in self.space:
            if v.id not in taken and v.supports(shape, dtype):
                groups.setdefault(v.template.relpath, []).append(v)
        return fit + _round_robin(list(groups.values()), self.sample - len(fit), self.seed)


def plan(op_name: str, *, shapes=None, dtypes=None, backend="auto", budget=None, seed=0, timeout=600.0,
         template=None, retime=False, retry_failed=False, force=False, picks=None, device=None) -> Plan:
    """What to run. `picks`: parameter dicts of variants of `template` to run first (e.g.
    the ones its author expects to win); the budget beyond them goes to their neighbours.
    `device`: the device the workers run on when it is not this machine's (a Ray cluster's)."""
    op = ops.get(op_name)
    be = device.backend if device is not None else backends.resolve(backend)
    dev = device if device is not None else backends.device(be)
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
                retry_failed, force, sample=first)


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


def run(p: Plan, *, progress=None, worker: Worker | None = None, notify=None, pool=None) -> list[dict]:
    """Run the plan; return every record of this (device, op) for the planned shapes and dtypes.

    `pool` (hlh_mlx.pool): worker lanes that run variants at once (default: one lane,
    `worker` or a new Worker). Every result is written here, in this thread, as it comes.
    Concurrent sweeps of one op share the work: each variant is claimed in the store before
    it runs; a variant claimed by another live sweep is left to it (and waited for at the
    end of its shape), one whose claimant died is run here. A variant whose worker crashed
    is run once more in the same run (a worker killed from outside costs only its variant)."""
    from . import pool as pool_mod
    path = store.path_for(p.device.slug, p.op.name)
    records = store.read(path)
    stale = {json.dumps(r, sort_keys=True) for r in store.to_redo(records, _redo_mode(p)) + _unranked(records)}
    rerun: set[tuple] = set()  # keys whose crash this run runs again

    def is_done(r):  # a record written before this run that it redoes does not count
        if store.result_key(r) in rerun and r.get("status") == "crashed":
            return False
        return json.dumps(r, sort_keys=True) not in stale

    done = {store.result_key(r) for r in records if is_done(r)}
    if pool is None:
        pool = pool_mod.Pool([pool_mod.LocalLane(worker or Worker(), owned=worker is None)])
    ctx = _Run(p, path, pool, progress, notify, is_done, done, rerun)
    try:
        for dtype in p.dtypes:
            for shape in p.shapes:
                ctx.shape(shape, dtype)
    finally:
        pool.stop()
        store.release(path)
    # the current renderings of the plan's templates only: records of older versions of a
    # template (another source, another id) stay in the file but are not ranked
    ids = {v.id for v in p.space} | {None}
    return [r for r in _local(path) if r.get("dtype") in p.dtypes and r.get("shape") in p.shapes
            and r.get("variant_id") in ids]


class _Run:
    """One sweep's scheduling: variants to idle lanes, replies to the store (one writer)."""

    POLL = 0.25

    def __init__(self, p: Plan, path, pool, progress, notify, is_done, done: set, rerun: set):
        self.p, self.path, self.pool, self.progress, self.notify = p, path, pool, progress, notify
        self.is_done, self.done, self.rerun = is_done, done, rerun
        self.timed = p.device.can_time
        # a claim is dead once its unit (the built-in, with its own limit, and a variant) is overdue
        self.stale_after = p.timeout + max(p.timeout, BUILTIN_TIMEOUT) + 60

    # -- one shape -----------------------------------------------------------------------
    def shape(self, shape, dtype):
        p, pool = self.p, self.pool
        self.cur = (shape, dtype)
        key = lambda v: _key(p, v, shape, dtype)  # noqa: E731
        # The built-in is timed in every run that times anything for this shape, by every
        # lane (device) before its first variant, so new variants are ranked against a
        # built-in measured on the same device in the same run (a resumed sweep may run on
        # another machine, days later).
        self.lanes_timed: set = set()
        if self.timed and (p.retime or key(None) not in self.done):
            lane = pool.lanes[0]
            self._wait_idle(lane)
            self._submit(lane, None)
        if self.progress and self.timed:
            self.progress(None, shape, dtype)
        pending: deque = deque((v, "new") for v in p.first_sample(shape, dtype))
        self.forced: set[str] = set()
        if self.timed:
            # the stored winners first: one an older timing method found is timed again by this
            # one (selection compares a shape's newest method alone, so a new-method sample
            # without it would hide it); --retime times them again even where this method has
            for best in reversed(_stored_winners(p, self.path, shape, dtype)[:2]):
                if p.retime:
                    self.forced.add(best.id)
                elif key(best) in self.done:
                    continue  # timed by this method already: no slot of the budget for it
                pending.appendleft((best, "new"))
        self.seen: set[str] = set()
        self.retried: set[str] = set()
        self.counted: set[str] = set()  # variants progress has been told about
        deferred: list = []
        told = False
        while True:
            for lane in pool.idle():
                v = None
                while pending and v is None:
                    v = self._consider(*pending.popleft(), deferred)
                if v is None:
                    break
                self._submit(lane, v)
            if not pool.busy():
                if pending:
                    continue
                # once the first sample is in, add neighbours of the best few
                if self.timed and p.budget is not None and len(self.seen) < p.budget:
                    more = _refinements(p, self.path, shape, dtype, self.seen)
                    if more:
                        pending.extend((v, "new") for v in more)
                        continue
                if not deferred:
                    break
                # variants another sweep is running: wait for its results; run any whose
                # claimant died
                if self.notify and not told:
                    told = True
                    self.notify(f"waiting for {len(deferred)} variant(s) another sweep of {p.op.name} is running "
                                f"(claims in {self.path}.claims)")
                waiting = []
                for v in deferred:
                    state = self._take(v)
                    if state == "mine":
                        pending.append((v, "mine"))
                    elif state == "claimed":
                        waiting.append(v)
                deferred[:] = waiting
                if deferred and not pending:
                    time.sleep(self.POLL)
                continue
            got = pool.get(timeout=self.POLL)
            if got is not None:
                self._reply(*got, pending)
        if self.lanes_timed:
            self._time_again(shape, dtype)

    def _consider(self, v, how, deferred):
        """The variant if a lane should run it now, else None (done, claimed elsewhere, or
        not for this shape)."""
        shape, dtype = self.cur
        if how == "mine":
            return v
        if how == "rerun":
            state = self._take(v)
        else:
            runnable = v.id not in self.seen and v.supports(shape, dtype)
            self.seen.add(v.id)
            if runnable and v.id in self.forced:
                return v
            state = self._take(v) if runnable and _key(self.p, v, shape, dtype) not in self.done else "skip"
        if state == "mine":
            return v
        if state == "claimed":
            deferred.append(v)
        self._count(v)
        return None

    def _count(self, v):
        if self.progress and v.id not in self.counted:
            self.counted.add(v.id)
            self.progress(v, *self.cur)

    def _take(self, v) -> str:
        """"mine" (run it), "done" (by another sweep) or "claimed" (running elsewhere)."""
        k = _key(self.p, v, *self.cur)
        state = store.claim(self.path, k, self.is_done, self.stale_after)
        if state == "done":
            self.done.add(k)
        return state

    def _submit(self, lane, v):
        """Hand `lane` the variant `v` (None: the built-in alone), preceded by the built-in
        where the lane has not timed it for this shape in this run."""
        shape, dtype = self.cur
        unit = []
        if self.timed and (v is None or lane.bundles_builtin or lane not in self.lanes_timed):
            unit.append(((None, False), _job(self.p, None, shape, dtype)))
            self.lanes_timed.add(lane)
        if v is not None:
            unit.append(((v, False), _job(self.p, v, shape, dtype)))
        label = f"{v.label() if v else 'built-in'} {self.p.op.shape_str(shape)} {dtype}"
        self.pool.submit(lane, unit, self.p.timeout, label)

    def _wait_idle(self, lane):
        while lane.outstanding:
            got = self.pool.get(timeout=self.POLL)
            if got is not None:
                self._reply(*got, deque())

    def _write(self, lane, v, reply: dict, job_seed=None, repeat=False) -> dict:
        p, (shape, dtype) = self.p, self.cur
        if self.timed and reply.get("device") and reply["device"] != p.device.slug:
            from .pool import MixedDevicesError
            raise MixedDevicesError(
                f"worker {lane.name} timed on {reply['device']!r}, this run on {p.device.slug!r}: one ranking "
                "compares kernels timed on one kind of device (choose GPUs of one kind: CUDA_VISIBLE_DEVICES, "
                "or a Ray cluster whose GPUs match); its results were not stored")
        rec = _record(p, shape, dtype, reply, v)
        timed_on = reply.get("timed_on") or lane.timed_on
        if self.timed and timed_on:
            rec["timed_on"] = timed_on
        if repeat:
            rec.update(repeat=True, correct=False)  # never ranked or used: it only checks the first timing
            store.append(self.path, rec)
        else:
            k = _key(p, v, shape, dtype)
            store.append_result(self.path, rec, k)
            self.done.add(k)
        return rec

    def _reply(self, lane, tag, reply, pending):
        v, repeat = tag
        self._write(lane, v, reply, repeat=repeat)
        if v is None or repeat:
            return
        shape, dtype = self.cur
        k = _key(self.p, v, shape, dtype)
        if reply.get("status") == "crashed" and v.id not in self.retried:
            # the worker died under it (a kernel fault, or killed from outside): once more,
            # on whichever lane is free; a second crash stays (store.MAX_HANG_ATTEMPTS)
            self.retried.add(v.id)
            self.rerun.add(k)
            pending.append((v, "rerun"))
            return
        self.rerun.discard(k)
        self._count(v)

    def _time_again(self, shape, dtype):
        """Time the winner and the built-in a second time, after everything else in this run,
        on the device that timed the winner first: the report shows how far two timings of
        one kernel in one run drift apart."""
        p = self.p
        best = _stored_best(p, self.path, shape, dtype)
        lane = self.pool.lanes[0]
        if best is not None:
            first = next((r for r in reversed(_local(self.path)) if r.get("variant_id") == best.id
                          and r.get("shape") == shape and r.get("dtype") == dtype and not r.get("repeat")), None)
            on = (first or {}).get("timed_on")
            lane = next((x for x in self.pool.lanes if on and x.timed_on == on), lane)
        self._wait_idle(lane)
        # the second timings under the variants' limit: this worker has built the built-in already
        unit = [((v, True), dict(_job(p, v, shape, dtype), repeat=True, timeout=p.timeout))
                for v in [None] + ([best] if best else [])]
        self.pool.submit(lane, unit, p.timeout, "timing the winner again")
        while lane.outstanding:
            got = self.pool.get(timeout=self.POLL)
            if got is not None:
                self._reply(*got, deque())


def _unranked(records) -> list[dict]:
    """The records of variants whose newest timing (the one selection ranks) has no timed
    built-in of its run to be ranked against (the built-in timed out or crashed before it on
    that device): not done, so the next run times them again after its built-in. Not once
    the built-in has failed store.MAX_HANG_ATTEMPTS times in a row there (it is not timed
    again by itself, so neither are they)."""
    last: dict = {}    # (shape, dtype, back end, method, device) -> the built-in record written last
    failed: dict = {}  # (shape, dtype, back end, method) -> the built-in's failures since it last answered
    newest: dict = {}  # (shape, dtype, back end, method, variant) -> whether its newest timing has a built-in
    mine: dict = {}    # the same key -> every record of it
    for r in records:
        if r.get("repeat") or r.get("source", "local") != "local":
            continue
        group = (r.get("shape_str"), r.get("dtype"), r.get("backend"), r.get("timing_method", 1))
        if r.get("template") == "builtin":
            last[(*group, r.get("timed_on"))] = r
            failed[group] = 0 if r.get("timing") else failed.get(group, 0) + (r.get("status") in store.RETRY_STATUSES)
            continue
        key = (*group, r.get("variant_id"))
        mine.setdefault(key, []).append(r)
        if r.get("timing"):
            newest[key] = bool((last.get((*group, r.get("timed_on"))) or {}).get("timing"))
    return [r for key, ranked in newest.items() if not ranked and failed.get(key[:4], 0) < store.MAX_HANG_ATTEMPTS
            for r in mine[key]]


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


def _job(p: Plan, v: Variant | None, shape, dtype) -> dict:
    if v is None:  # its own limit (a lane gives each job of a unit the job's "timeout" where set)
        return {"kind": "builtin", "op": p.op.name, "backend": p.backend, "dtype": dtype, "time_shape": shape,
                "timeout": max(p.timeout, BUILTIN_TIMEOUT)}
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
            out += [n for n in variants.neighbours(best, p.space) if n.id not in seen and n.supports(shape, dtype)]
    return out[: max(0, p.budget - len(seen))]
