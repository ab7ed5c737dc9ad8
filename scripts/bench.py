"""Benchmarks openpi-merge against the machine's and Orbax's limits, on one checkpoint, in one run.

  python scripts/bench.py                      # full-scale pi0 (about 3.3 B parameters): minutes, ~20 GB of disk
  python scripts/bench.py --scale=tiny         # smoke run

The synthetic checkpoint is stored as openpi's single-GPU LoRA configs store it (Orbax's single-device defaults: one
chunk per array, an array over 2 GiB split on its last axis); ``--layout=fsdp`` or ``--layout=layer`` for others.

Each approach runs as its own process, timed by wall clock, with its peak RSS from wait4():
  1. cp -r of the checkpoint (the disk's limit),
  2. Orbax restore-all + save-all of the same params (Orbax's own floor),
  3. openpi-merge end to end (the CLI, default settings: verification on),
  4. the approach users write by hand: restore everything to numpy, merge in numpy, save,
  5. openpi-merge streamed under a memory budget (``--budget_gb``, 2 GB by default).
With ``--bucket=gs://BUCKET/PREFIX`` (or ``--bucket=emulator``: a fake-gcs-server on 127.0.0.1, from the test extra),
the checkpoint is also uploaded there and three more runs read and write gs:// directly: Orbax restore-all +
save-all, openpi-merge and openpi-merge streamed. Their GB/s is bytes read plus written over wall time, through
tensorstore and gcsfs over HTTP; against the emulator that is the client stack's and the emulator's CPU cost on
loopback (no network, no GCS latency), not what a bucket in a region delivers.
An approach that fails (the hand-written one can run out of memory) is reported with how it ended, not dropped.
Bytes read and written are the on-disk sizes of what each approach reads and writes. The page cache is warm for all
of them (the checkpoint was just written or read), so the comparison is of CPU and memory work, not of the disk.
The header also gives what memory mapped afresh costs on the host (``_fresh_memory``): the merge's system time
depends on it (README, Benchmark). Writes a markdown table and a JSON file to --out.
"""

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _orbax_roundtrip(params_dir: str, out_dir: str) -> None:
    """Approach 2: restore every array with Orbax onto the default device and save them all again."""
    from openpi_merge import checkpoint, sharding, storage

    contents = checkpoint.read_contents(storage.resolve(params_dir))
    params = checkpoint.restore(storage.resolve(params_dir), contents, sharding.single_device())
    checkpoint.save(storage.resolve(out_dir) / "params", params, value_suffix=contents.value_suffix)


def _numpy_merge(params_dir: str, out_dir: str, config_name: str) -> None:
    """Approach 4: the hand-written script: restore to numpy, merge each kernel in float32 numpy, save.

    Written with care for memory (in-place float32 updates), as a user would after a first run ran out of it.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import traverse_util

    from openpi_merge import checkpoint as ckpt
    from openpi_merge import config, plan

    settings_config = config.make_config(config_name)
    settings_config.input, settings_config.output = params_dir, out_dir
    settings = config.read_settings(settings_config)
    contents = ckpt.read_contents(pathlib.Path(params_dir))
    merge_plan = plan.make_plan(contents.leaves, settings)
    with ocp.PyTreeCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir)
        item = {"params": getattr(metadata, "item_metadata", metadata)["params"]}
        args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), item)
        params = checkpointer.restore(params_dir, ocp.args.PyTreeRestore(item=item, restore_args=args))
    suffix = ("value",) if contents.value_suffix else ()
    flat = traverse_util.flatten_dict(params["params"])
    for pair in merge_plan.pairs:
        w, a, b = (flat[leaf.path + suffix].astype(np.float32) for leaf in (pair.kernel, pair.lora_a, pair.lora_b))
        a_labels, b_labels, w_labels = pair.update_equation.replace("->", ",").split(",")
        delta = np.einsum(f"...{a_labels},...{b_labels}->...{w_labels}", a, b, optimize=True)
        delta *= pair.scale
        w += delta
        del delta
        flat[pair.kernel.path + suffix] = w.astype(pair.out_dtype)
        del flat[pair.lora_a.path + suffix], flat[pair.lora_b.path + suffix]
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(pathlib.Path(out_dir) / "params", {"params": traverse_util.unflatten_dict(flat)})


def _du(path: str | pathlib.Path) -> int:
    if "://" in str(path):  # Asked of a child: the parent stays free of Orbax and the storage clients.
        command = [sys.executable, __file__, "_du", str(path)]
        return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
    return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


def _remote_du(prefix: str) -> None:
    """Child process: prints the bytes of every object under ``prefix``."""
    from openpi_merge import storage

    fs, root = storage._filesystem(storage.resolve(prefix))
    print(fs.du(root) if storage.objects(storage.resolve(prefix)) else 0)


def _upload(step: str, prefix: str) -> None:
    """Child process: copies a local step dir to ``prefix`` object by object, with Orbax's commit markers last."""
    from openpi_merge import storage

    storage.remove(storage.resolve(prefix))
    storage.copy_tree(pathlib.Path(step), storage.resolve(prefix))
    storage.write_marker(storage.resolve(prefix) / "params")
    storage.write_marker(storage.resolve(prefix))


def _remove(prefix: str) -> None:
    from openpi_merge import storage

    storage.remove(storage.resolve(prefix))


def _ending(status: int) -> str:
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit code {os.waitstatus_to_exitcode(status)}"


_TICKS = os.sysconf("SC_CLK_TCK")


def _thread_kind(comm: str) -> str:
    """A thread's kind from its name: numbers dropped (``ts_pool_worker7`` and ``ts_pool_worker12`` are one kind)."""
    return re.sub(r"[-_:]?\d+$", "", comm) or comm


class _ThreadSampler:
    """Samples a child's threads from /proc every ``period`` seconds: CPU seconds per thread kind, and cores busy.

    A thread's CPU time is its last sample, so the time of a thread that ended between samples is partly lost; the
    process total (wait4's rusage) is exact, and the table's CPU seconds come from it.
    """

    def __init__(self, pid: int, period: float = 0.2) -> None:
        self._pid, self._period = pid, period
        self._threads: dict[int, tuple[str, float]] = {}
        self._busy: list[float] = []  # Cores busy over each period.
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> float:
        total = 0.0
        for task in pathlib.Path(f"/proc/{self._pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # The thread ended.
            comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
            self._threads[int(task.name)] = (_thread_kind(comm), seconds)
            total += seconds
        return total

    def _loop(self) -> None:
        last, last_time = 0.0, time.perf_counter()
        while not self._done.wait(self._period):
            try:
                now = self._sample()
            except OSError:
                return  # The child has exited.
            moment = time.perf_counter()
            self._busy.append(max(0.0, now - last) / (moment - last_time))
            last, last_time = now, moment

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        kinds: dict[str, float] = {}
        for kind, seconds in self._threads.values():
            kinds[kind] = kinds.get(kind, 0.0) + seconds
        busy = sorted(self._busy)
        return {
            "cpu_s_by_thread": dict(sorted(((k, round(v, 1)) for k, v in kinds.items()), key=lambda kv: -kv[1])),
            "cores_busy_median": busy[len(busy) // 2] if busy else None,
        }


def _run(name: str, command: list[str], reads: str | pathlib.Path, writes: str | pathlib.Path) -> dict:
    """Runs one approach as a child process; wall seconds, its own peak RSS and CPU seconds (wait4), bytes on disk,
    and CPU seconds per thread kind (``_ThreadSampler``)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = _ThreadSampler(child.pid)
    stderr_lines: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr_lines.append(child.stderr.read()), daemon=True)
    reader.start()
    stdout = child.stdout.read()
    reader.join()
    stderr = b"".join(stderr_lines)
    threads = sampler.stop()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    failure = None if status == 0 else _ending(status)
    if failure:
        print(f"{name} failed ({failure}):\n{stderr.decode()[-2000:]}", file=sys.stderr)
    read, written = _du(reads), (0 if failure else _du(writes))
    devices = re.search(r"devices: (.*)", stdout.decode())
    return {
        "approach": name,
        "failure": failure,
        "wall_s": wall,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        **threads,
        "read_gb": read / 1e9,
        "written_gb": written / 1e9,
        "gb_per_s": (read + written) / 1e9 / wall,
        "devices": devices[1] if devices else None,
        "stdout_tail": stdout.decode()[-3000:],
    }


_PROBE_BYTES = 1 << 30  # What _fresh_memory maps each time.
_PROBE_IDLE_S = 4.0  # How long the probe's memory stays free before it is mapped again.


def _touch_fresh(nbytes: int) -> float:
    """Seconds to allocate ``nbytes`` with NumPy and write every byte: each page faults in first. NumPy asks for
    transparent huge pages for large arrays, as the merge's malloc does (``openpi_merge.memory``)."""
    import numpy as np

    started = time.perf_counter()
    np.empty(nbytes, np.uint8).fill(1)
    return time.perf_counter() - started


def _fresh_memory() -> dict:
    """What memory mapped afresh costs on this host, in seconds per GB written: mapped right after the same amount was
    freed, and after it stayed free for _PROBE_IDLE_S. Where the host takes free memory back from its guest (a VM
    with free page reporting, as Firecracker's balloon device does), the second is several times the first. The merge
    maps and frees buffers for every layer and chunk (tens of GB on full pi0), and the kernel zeroes each page it
    maps: that is where a host's rate shows in its system time."""
    _touch_fresh(_PROBE_BYTES)
    freed = _touch_fresh(_PROBE_BYTES)
    time.sleep(_PROBE_IDLE_S)
    idle = _touch_fresh(_PROBE_BYTES)
    return {
        "fresh_memory_s_per_gb": round(freed / (_PROBE_BYTES / 1e9), 3),
        "fresh_memory_s_per_gb_after_idle": round(idle / (_PROBE_BYTES / 1e9), 3),
        "fresh_memory_idle_s": _PROBE_IDLE_S,
    }


def _prepare(model: str, scale: str, layout: str, checkpoint_dir: str, work: str) -> None:
    """Child process: writes the synthetic checkpoint unless one is given; prints its facts and the machine's as JSON.

    Done in a child so that the parent stays small: a child's peak RSS counts its parent's at fork.
    """
    import jax

    from openpi_merge import checkpoint
    from openpi_merge.testing import synthetic

    started = time.perf_counter()
    step = (
        pathlib.Path(checkpoint_dir)
        if checkpoint_dir
        else synthetic.write_checkpoint(work, model=model, scale=scale, chunking=layout)
    )
    write_s = None if checkpoint_dir else time.perf_counter() - started
    params_dir = checkpoint.locate_input(str(step)).params_dir
    leaves = checkpoint.read_contents(params_dir).leaves.values()
    cpuinfo, meminfo = pathlib.Path("/proc/cpuinfo").read_text(), pathlib.Path("/proc/meminfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    memory = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemTotal"))
    machine = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 1e9, 1),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        **_fresh_memory(),
    }
    facts = {"step": str(step), "params_dir": str(params_dir), "write_s": write_s, "machine": machine}
    print(json.dumps({**facts, "in_memory_gb": sum(leaf.nbytes for leaf in leaves) / 1e9}))


def _table(rows: list[dict], in_memory_gb: float) -> str:
    lines = [
        "| approach | wall s | peak RSS GB | RSS / tree | CPU s | cores busy | read GB | written GB | GB/s | x cp "
        "| x Orbax |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    walls = {row["approach"]: row["wall_s"] for row in rows}
    cp, orbax = walls.get("cp -r", math.nan), walls.get("orbax restore+save", math.nan)  # Skipped: nan.
    for row in rows:
        wall = f"{row['wall_s']:.1f}" + (f" ({row['failure']})" if row["failure"] else "")
        lines.append(
            f"| {row['approach']} | {wall} | {row['peak_rss_gb']:.2f} | "
            f"{row['peak_rss_gb'] / in_memory_gb:.2f} | {row['cpu_s']:.0f} | {row['cpu_s'] / row['wall_s']:.2f} | "
            f"{row['read_gb']:.2f} | {row['written_gb']:.2f} | "
            f"{row['gb_per_s']:.2f} | {row['wall_s'] / cp:.2f} | {row['wall_s'] / orbax:.2f} |"
        )
    lines += [
        "",
        "CPU seconds by thread kind (sampled from /proc every 0.2 s; threads that ended between samples "
        "are undercounted):",
        "",
    ]
    for row in rows:
        kinds = ", ".join(f"{kind} {seconds:.0f}" for kind, seconds in row["cpu_s_by_thread"].items() if seconds >= 1)
        lines.append(f"- {row['approach']}: {kinds}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pi0", choices=("pi0", "pi05", "pi0_fast"))
    parser.add_argument("--scale", default="full", choices=("tiny", "full"))
    parser.add_argument(
        "--layout",
        default="orbax",
        choices=("orbax", "fsdp", "layer"),
        help="how the synthetic checkpoint stores its arrays: Orbax's single-device defaults (what openpi's single-GPU "
        "LoRA configs write: one chunk per array, over 2 GiB split on the last axis), 256 MiB chunks of the array over "
        "2 GiB as an FSDP save, or a layer per chunk",
    )
    parser.add_argument("--checkpoint", help="an existing LoRA step dir to use instead of writing a synthetic one")
    parser.add_argument("--workdir", help="where to write checkpoints and outputs (default: a temporary dir)")
    parser.add_argument("--out", default="bench_out", help="where the markdown table and JSON go")
    parser.add_argument("--budget_gb", type=float, default=2.0, help="memory budget of the streamed openpi-merge run")
    parser.add_argument("--merge_flag", action="append", default=[], help="extra openpi-merge run: 'name=--config.x=1'")
    parser.add_argument(
        "--skip", action="append", default=[], help="an approach not to run, by name (e.g. 'numpy by hand')"
    )
    parser.add_argument("--bucket", help="also time gs:// runs under this prefix; 'emulator': fake-gcs-server locally")
    args = parser.parse_args()
    emulator = _start_emulator() if args.bucket == "emulator" else None
    bucket = f"gs://{_EMULATOR_BUCKET}/bench" if emulator else args.bucket

    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="openpi-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    prepare = [python, __file__, "_prepare", args.model, args.scale, args.layout, args.checkpoint or ""]
    prepare.append(str(work / "input"))
    facts = json.loads(subprocess.run(prepare, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    step, params_dir, in_memory_gb, machine = (facts[k] for k in ("step", "params_dir", "in_memory_gb", "machine"))
    print(f"checkpoint {step}: {in_memory_gb:.2f} GB in memory (written in {facts['write_s'] or 0:.1f} s)", flush=True)
    config = f"configs/{args.model}_lora.py"

    def out(name: str) -> pathlib.Path:
        path = work / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    runs = [
        ("cp -r", ["cp", "-r", str(step), str(out("cp"))], step, work / "cp"),
        ("orbax restore+save", [python, __file__, "_orbax", params_dir, str(out("orbax"))], params_dir, work / "orbax"),
        ("openpi-merge", [python, "-m", "openpi_merge", f"--config={config}", f"--config.input={step}",
                          f"--config.output={out('merged')}"], params_dir, work / "merged"),
        ("numpy by hand", [python, __file__, "_numpy", params_dir, str(out("numpy")), args.model],
         params_dir, work / "numpy"),
    ]  # fmt: skip
    streamed = f"openpi-merge, {args.budget_gb:g} GB budget=--config.memory_budget_gb={args.budget_gb}"
    for index, extra in enumerate([streamed, *args.merge_flag]):
        name, flags = extra.split("=", 1)
        target = f"merged_{index}"
        command = [python, "-m", "openpi_merge", f"--config={config}", f"--config.input={step}"]
        runs.append((name, [*command, f"--config.output={out(target)}", *flags.split()], params_dir, work / target))

    if bucket:
        remote_step = f"{bucket}/input/{pathlib.Path(step).name}"
        subprocess.run([python, __file__, "_upload", str(step), remote_step], check=True)
        remote_params, merge = f"{remote_step}/params", [python, "-m", "openpi_merge", f"--config={config}"]
        runs += [
            ("orbax restore+save, gs://", [python, __file__, "_orbax", remote_params, f"{bucket}/orbax"],
             remote_params, f"{bucket}/orbax"),
            ("openpi-merge, gs://", [*merge, f"--config.input={remote_step}", f"--config.output={bucket}/merged"],
             remote_params, f"{bucket}/merged"),
            (f"openpi-merge, gs://, {args.budget_gb:g} GB budget",
             [*merge, f"--config.input={remote_step}", f"--config.output={bucket}/streamed",
              f"--config.memory_budget_gb={args.budget_gb}"], remote_params, f"{bucket}/streamed"),
        ]  # fmt: skip

    rows = []
    for name, command, reads, writes in runs:
        if name in args.skip:
            continue
        rows.append(_run(name, command, reads, writes))
        print(f"{name}: {rows[-1]['wall_s']:.1f} s, peak RSS {rows[-1]['peak_rss_gb']:.2f} GB", flush=True)
        if "://" in str(writes):
            subprocess.run([python, __file__, "_remove", str(writes)], check=True)
        else:
            shutil.rmtree(writes, ignore_errors=True)
    if bucket:
        subprocess.run([python, __file__, "_remove", f"{bucket}/input"], check=True)
    if emulator:
        emulator.kill()

    table = _table(rows, in_memory_gb)
    merged_on = next(row["devices"] for row in rows if row["approach"] == "openpi-merge")
    header = (
        f"{args.model} ({args.scale}, layout {args.layout}), {in_memory_gb:.2f} GB in memory; {machine['cpu']}, "
        f"{machine['cores']} cores, "
        f"{machine['memory_gb']} GB RAM, JAX {machine['jax']} on {merged_on}, {machine['date']}; memory mapped afresh: "
        f"{machine['fresh_memory_s_per_gb']:.2f} s/GB, {machine['fresh_memory_s_per_gb_after_idle']:.2f} s/GB after "
        f"{machine['fresh_memory_idle_s']:g} s free"
    )
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(f"{header}\n\n{table}\n")
    (out_dir / "bench.json").write_text(
        json.dumps({"model": args.model, "scale": args.scale, "layout": args.layout, "in_memory_gb": in_memory_gb,
                    "machine": machine, "checkpoint_write_s": facts["write_s"], "runs": rows}, indent=2)
    )  # fmt: skip
    print(f"\n{header}\n\n{table}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


_EMULATOR_BUCKET = "openpi-merge-bench"


def _start_emulator():
    """fake-gcs-server on 127.0.0.1 with a bucket; its environment set here, so every child reaches only it."""
    sys.path.insert(0, str(REPO / "tests"))
    import gcs_emulator

    emulator = gcs_emulator.start()
    gcs_emulator.set_environment(emulator.url)
    emulator.create_bucket(_EMULATOR_BUCKET)
    return emulator


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        _prepare(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] in ("_du", "_upload", "_remove"):
        {"_du": _remote_du, "_upload": _upload, "_remove": _remove}[sys.argv[1]](*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_orbax":
        _orbax_roundtrip(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_numpy":
        _numpy_merge(*sys.argv[2:])
    else:
        main()
