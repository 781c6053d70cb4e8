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


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and of the children it reaped), every process."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2:].split()
            out[int(d.name)] = (int(rest[1]), sum(int(x) for x in rest[11:15]) / tick)
    return out


class OthersSampler:
    """CPU seconds the rest of the (shared) machine uses from now until `stop()`: every
    process but ours, sampled every 0.5 s. Ours: this process and the descendants of
    `roots` (the command, the Ray cluster), counted as ours even once they leave the tree
    (a Ray job's worker processes are orphaned when its driver exits)."""

    def __init__(self, roots: list[int]):
        import threading
        self.roots = [r for r in roots if r] + [os.getpid()]
        self.mine: set[int] = set()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._sample(start=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.5):
            self._sample()

    def _sample(self, start: bool = False):
        table = proc_table()
        children: dict[int, list[int]] = {}
        for pid, (pp, _) in table.items():
            children.setdefault(pp, []).append(pid)
        todo, seen = [r for r in self.roots if r in table], set()
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                todo += children.get(pid, [])
        self.mine |= seen
        for pid, (_, cpu) in table.items():
            if pid not in self.mine:
                self.first.setdefault(pid, cpu if start else 0.0)  # born while we watched: all of it
                self.last[pid] = cpu

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample()
        return sum(self.last[p] - self.first[p] for p in self.last if p not in self.mine)


def wait_quiet(max_busy: float, cluster: int | None, window: float = 10.0, timeout: float = 7200.0) -> float:
    """Wait for a `window` in which the rest of the machine (all but us and our idle Ray
    cluster) is busy less than `max_busy` of its cores; returns the share seen."""
    deadline = time.time() + timeout
    while True:
        sampler = OthersSampler([cluster])
        time.sleep(window)
        frac = sampler.stop() / (window * (os.cpu_count() or 1))
        if frac < max_busy or time.time() > deadline:
            return frac


def run(cmd: list[str], cache: Path, env: dict, cluster: int | None = None) -> tuple[float, float, float, str, int]:
    """(wall s, CPU s of this run's processes - the command's, and the Ray cluster's that do
    its work -, CPU s of the rest of the machine, output, exit status)."""
    e = dict(os.environ, **env, HLH_MLX_CACHE=str(cache), PYTHONPATH=str(ROOT))
    busy, t = busy_seconds(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = OthersSampler([proc.pid, cluster])
    out, _ = proc.communicate()
    wall = time.perf_counter() - t
    others = sampler.stop()
    busy = busy_seconds() - busy
    return wall, max(0.0, busy - others), others, out, proc.returncode


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
                    wall, cpu, other_cpu, out, rc = run(base_cmd + extra, cache, RAY_ENV if "--ray" in extra else {},
                                                        holder.pid if holder is not None else None)
                    shutil.rmtree(cache, ignore_errors=True)
                    summary = next((ln for ln in out.splitlines() if re.match(r"\d+ passed, \d+ failed", ln)), "?")
                    others = other_cpu / (wall * cores)
                    print(f"{mode:>14} run {i + 1}: {wall:6.1f} s wall, {cpu:6.1f} s CPU, the rest of the machine "
                          f"{100 * others:.0f}% of its cores ({summary}; load before {load:.2f})", flush=True)
                    if others <= a.max_others or attempt == a.attempts - 1:
                        results[mode].append({"wall": wall, "cpu": cpu, "load": load, "others": others,
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
        "- `CPU s`: the command, its processes and (`--ray`) the Ray cluster's processes during the run "
        "(the machine's busy time, `/proc/stat`, less the others'); `others`: the share of the machine's cores "
        "every other process used during the run (sampled every 0.5 s from `/proc/*/stat`). The machine is "
        f"shared: each run waited for 10 s in which others used under {100 * a.max_others:.0f}%, and a run during "
        f"which they used more was run again ({discarded} such runs).",
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
