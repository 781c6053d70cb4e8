"""Wall clock of an emulator check of a whole op space: serial, `--workers N`, and on a
local Ray cluster (`--ray ADDRESS`, the cluster started before the clock runs), with the
verdicts of every run compared with the serial run's.

    python benchmarks/workers_cpu.py [--op rms_norm] [--template rows] [--workers 2] [--repeats 2]
                                     [--ray] [--out benchmarks/results/workers_cpu.md]

Every run starts from a compile cache holding only the emulator's runtime (built once
before any clock runs): each variant is compiled and checked, as in a first check of a
new template. Runs of the modes alternate, so a change in the machine's load hits all of
them; the load average before each run is written down with it.

Writes nothing unless --out FILE is given (an existing FILE is refused without --force).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hlh_mlx import paths  # noqa: E402  (the checkout's package, as the runs below use it)

# the benchmark's own throwaway cluster, on this machine only: a second process joining it
# by address would need the token the first one made (Ray >= 2.5x token authentication)
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
HOLDER = """
import sys, ray
ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


def verdicts(out: str) -> list[str]:
    """`check`'s verdict lines, without counters, worker names and order, and without
    which of the racing threads a sanitizer report names first."""
    found = []
    for line in out.splitlines():
        if line.startswith("[") and "] " in line:
            found.append(line.split("] ", 1)[1])
        elif line.startswith("     ") and found:
            found[-1] += " | " + re.sub(r"\(offset \d+\)|thread \(\d+, \d+, \d+\)", "", line.strip())
    return sorted(found)


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root_pid: int | None) -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, its own CPU seconds, CPU seconds of the children it reaped) for
    a process and its descendants: the Ray cluster's, whose workers do a `--ray` run's checks."""
    if root_pid is None:
        return {}
    stats = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2:].split()
            stats[int(d.name)] = (int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14]))
    tree, todo = set(), [root_pid]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += [c for c, st in stats.items() if st[0] == pid and c not in tree]
    tick = os.sysconf("SC_CLK_TCK")
    return {p: (stats[p][0], stats[p][1] / tick, stats[p][2] / tick) for p in tree if p in stats}


def tree_cpu_seconds(root_pid: int | None) -> float:
    return sum(own + kids for _, own, kids in tree_cpu(root_pid).values())


class TreeSampler:
    """CPU the process tree under `root_pid` spends from now until `stop()`, sampled every
    0.5 s. Every process seen counts with what it used (itself and the children it reaped)
    since it was first seen; a process its parent reaped while we watched is taken out of
    the parent's count again (it is counted on its own). A Ray job's workers leave when its
    driver exits, and their worker processes, orphaned, leave the tree: both count at their
    last sample."""

    def __init__(self, root_pid: int | None):
        import threading
        self.root = root_pid
        self.first = tree_cpu(root_pid)
        self.last = dict(self.first)
        self.reaped: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.5):
            self._sample()

    def _sample(self):
        now = tree_cpu(self.root)
        for pid, st in now.items():
            self.first.setdefault(pid, (st[0], 0.0, 0.0))  # born while we watched
            self.last[pid] = st
        for pid, (ppid, _, _) in self.last.items():
            if pid not in now and ppid in now:
                self.reaped.add(pid)  # its time went into its parent's children time

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        total = 0.0
        for pid, (_, own, kids) in self.last.items():
            _, own0, kids0 = self.first[pid]
            total += (own - own0) + (kids - kids0)
            if pid in self.reaped:
                total -= own + kids  # already in the parent's
        return total


def wait_quiet(max_busy: float, cluster: int | None, window: float = 10.0, timeout: float = 7200.0) -> float:
    """Wait for a `window` in which the machine (but our idle Ray cluster) is busy less
    than `max_busy` of its cores (it is shared); returns the busy fraction seen."""
    deadline = time.time() + timeout
    while True:
        b, c = busy_seconds(), tree_cpu_seconds(cluster)
        time.sleep(window)
        frac = (busy_seconds() - b - (tree_cpu_seconds(cluster) - c)) / (window * (os.cpu_count() or 1))
        if frac < max_busy or time.time() > deadline:
            return frac


def run(cmd: list[str], cache: Path, env: dict, cluster: int | None = None) -> tuple[float, float, float, str, int]:
    """(wall s, CPU s of the command and its children, CPU s the whole machine was busy,
    output, exit status). A Ray cluster's processes are not the command's children: their
    CPU time is in the machine's, not the command's."""
    import resource
    e = dict(os.environ, **env, HLH_MLX_CACHE=str(cache), PYTHONPATH=str(ROOT))
    before, busy = resource.getrusage(resource.RUSAGE_CHILDREN), busy_seconds()
    sampler = TreeSampler(cluster) if cluster else None
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after, busy = resource.getrusage(resource.RUSAGE_CHILDREN), busy_seconds() - busy
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if sampler is not None:
        cpu += sampler.stop()  # the cluster's work for this run
    return wall, cpu, busy, r.stdout + r.stderr, r.returncode


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="rms_norm")
    ap.add_argument("--template", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also on a local Ray cluster (needs hlh_mlx[ray])")
    paths.output_options(ap, help="also write the table (markdown) to FILE")
    ap.add_argument("--max-others", type=float, default=0.05,
                    help="a run during which the rest of the machine used more than this share of its cores is "
                         "run again (the machine is shared); 1 keeps every run")
    ap.add_argument("--attempts", type=int, default=8, help="runs of one mode and repeat at most")
    return paths.parse_refusing_overwrite(ap, argv, outputs)


outputs = paths.given_output  # the files this run writes


def main() -> None:
    a = parse_args()

    work = Path(tempfile.mkdtemp(prefix="hlh-workers-bench-"))
    base_cmd = [sys.executable, "-m", "hlh_mlx", "check", a.op] + ([a.template] if a.template else [])
    # the emulator's runtime, built once: every timed run starts with it and no kernel
    warm = work / "runtime-cache"
    subprocess.run([sys.executable, "-m", "hlh_mlx", "check", "matmul", "tiled", "-p", "BS=8", "-p", "PAD=0",
                    "--dtype", "float32"], cwd=ROOT, env=dict(os.environ, HLH_MLX_CACHE=str(warm),
                                                              PYTHONPATH=str(ROOT)), check=True, capture_output=True)
    shutil.rmtree(warm / "emulator" / "kernels", ignore_errors=True)

    modes = {"serial": [], f"--workers {a.workers}": ["--workers", str(a.workers)]}
    ray_start, holder = None, None
    if a.ray:
        # a cluster of our own (not `ray start`, whose `ray stop` ends every cluster on the
        # machine): a process holds it until its stdin closes; the runs join it by address
        t = time.perf_counter()
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(os.cpu_count())], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT), **RAY_ENV))
        address = holder.stdout.readline().strip()
        ray_start = time.perf_counter() - t
        modes["--ray ADDRESS"] = ["--ray", address]
    results: dict[str, list[dict]] = {m: [] for m in modes}
    discarded = 0
    cores = os.cpu_count() or 1
    try:
        for i in range(a.repeats):
            for mode, extra in modes.items():
                for attempt in range(a.attempts):
                    if a.max_others < 1:
                        wait_quiet(a.max_others, holder.pid if holder is not None else None)
                    cache = work / f"cache-{mode.replace(' ', '_')}-{i}-{attempt}"
                    shutil.copytree(warm, cache)
                    load = os.getloadavg()[0]
                    wall, cpu, busy, out, rc = run(base_cmd + extra, cache, RAY_ENV if "--ray" in extra else {},
                                                   holder.pid if holder is not None and "--ray" in extra else None)
                    shutil.rmtree(cache, ignore_errors=True)
                    summary = next((ln for ln in out.splitlines() if re.match(r"\d+ passed, \d+ failed", ln)), "?")
                    others = max(0.0, busy - cpu) / (wall * cores)
                    print(f"{mode:>14} run {i + 1}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, the rest of the machine "
                          f"{100 * others:.0f}% of its cores ({summary}; load before {load:.2f})", flush=True)
                    if others <= a.max_others or attempt == a.attempts - 1:
                        results[mode].append({"wall": wall, "cpu": cpu, "busy": busy, "load": load, "others": others,
                                              "verdicts": verdicts(out), "rc": rc, "summary": summary})
                        break
                    discarded += 1
                    print("   run again: the machine was shared during that run", flush=True)
    finally:
        if holder is not None:
            holder.stdin.close()
            holder.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)

    reference = results["serial"][0]["verdicts"]
    serial = statistics.median(r["wall"] for r in results["serial"])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import mlx.core as mx
    lines = [
        f"# `check {a.op}{' ' + a.template if a.template else ''}` on the emulator: serial, "
        f"`--workers {a.workers}`{', `--ray ADDRESS` (a local cluster)' if a.ray else ''}",
        "",
        f"- Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, MLX {mx.__version__}",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `python benchmarks/workers_cpu.py --op {a.op}{' --template ' + a.template if a.template else ''} "
        f"--workers {a.workers} --repeats {a.repeats}{' --ray' if a.ray else ''}`",
        f"- Jobs: {len(reference)} variant x dtype checks (the whole Metal space, every dtype), sanitizer on; "
        "each run starts from a compile cache holding only the emulator's runtime (every kernel is compiled).",
        "- Wall clock of the whole command (process start to exit), runs of the modes alternating."
        + (f" The Ray cluster (`ray.init(address='local', num_cpus={os.cpu_count()})` in a process of its own) "
           f"was started before the clock ran ({ray_start:.1f} s); `--ray ADDRESS` joins it, and its wall clock "
           "includes joining and shipping hlh_mlx to the cluster." if a.ray else ""),
        "",
        "- `CPU s`: the command, its processes and (`--ray`) the Ray cluster's processes during the run; "
        "`others`: the share of the machine's cores the rest of the (shared) machine used during the run "
        f"(`/proc/stat`). Runs where others used more than {100 * a.max_others:.0f}% were run again "
        f"({discarded} such runs), after waiting for {100 * a.max_others:.0f}% quiet over 10 s.",
        "",
        "| mode | wall clock per run (s) | median (s) | speedup vs serial | CPU s per run | others per run "
        "| load average before each run | verdicts = serial |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, rs in results.items():
        med = statistics.median(r["wall"] for r in rs)
        same = all(r["verdicts"] == reference and r["rc"] == results["serial"][0]["rc"] for r in rs)
        walls = ", ".join(f"{r['wall']:.1f}" for r in rs)
        loads = ", ".join(f"{r['load']:.2f}" for r in rs)
        cpus = ", ".join(f"{r['cpu']:.0f}" for r in rs)
        others = ", ".join(f"{100 * r['others']:.0f}%" for r in rs)
        lines.append(f"| {mode} | {walls} | {med:.1f} | {serial / med:.2f}x | {cpus} | {others} | {loads} | "
                     f"{'yes' if same else 'NO'} ({rs[0]['summary']}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
