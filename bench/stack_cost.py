#!/usr/bin/env python3
"""What one captured Python stack costs, and how many the shipped sampling
captures for a leaking process.

Part 1 runs one allocation loop -- 4 KiB `bytes` objects (libc calloc,
outside pymalloc) made and dropped DEPTH Python frames deep -- under a fresh
`pymem agent` per mode, ROUNDS times interleaved:

  off      --sample-bytes 0   allocation probes run, no stack is captured
  every    --sample-bytes 1   every allocation captures its stack
  default  (256 KiB)          the shipped sampling

The cost of a stack is "every" minus "off": the same probes run the same
number of times; only the stack walk, the STACKS map update and the event
differ. The kernel figure comes from BPF run-time statistics
(kernel.bpf_stats_enabled, switched on for the run and restored): the mean
run time of `raw_alloc_ret`, the program that captures the stack. The loop
and agent-CPU figures are per allocation of the workload.

Part 2 runs tests/workloads/sites.py (two leaks and a churn) under the
default agent and counts the stacks it captures per second, from the
agent's own per-process counters: new arenas (arena bytes allocated / arena
size) and sampled blocks (bytes allocated outside pymalloc / 256 KiB).
Times the per-stack cost, that is the price of allocation sites for a
process that leaks fast.

Run it on an otherwise quiet machine: the agent probes every Python process.
Needs root, a built pymem (cargo build --release -p pymem-agent) and Python
3.8+.

  sudo python3 bench/stack_cost.py [--pymem PATH] [--python PATH]
                                   [--depth 20] [--blocks 100000] [--rounds 3]
"""
import argparse
import ctypes
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WORKLOAD = r"""
import json, sys, time
depth, blocks = int(sys.argv[1]), int(sys.argv[2])

def allocate(n):
    keep = [None] * 64  # a bounded window: memory stays flat
    for i in range(n):
        keep[i % 64] = bytes(4096)

def nest(level, n):
    if level <= 1:
        return allocate(n)
    return nest(level - 1, n)

print("ready", flush=True)
sys.stdin.readline()
wall, cpu = time.perf_counter(), time.process_time()
nest(depth, blocks)
print(json.dumps({"seconds": time.perf_counter() - wall,
                  "cpu_seconds": time.process_time() - cpu}), flush=True)
sys.stdin.readline()
"""

MODES = [("off", "0"), ("every", "1"), ("default", None)]

# bpf(2): program info by id, for the names fdinfo does not give.
SYS_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
PROG_INFO_NAME = slice(64, 80)  # struct bpf_prog_info.name
libc = ctypes.CDLL(None, use_errno=True)


def bpf_prog_name(prog_id):
    attr = struct.pack("III", prog_id, 0, 0)
    fd = libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(BPF_PROG_GET_FD_BY_ID),
                      ctypes.c_char_p(attr), ctypes.c_uint(len(attr)))
    if fd < 0:
        return f"prog{prog_id}"
    try:
        info = ctypes.create_string_buffer(512)
        attr = ctypes.create_string_buffer(
            struct.pack("IIQ", fd, len(info), ctypes.addressof(info)), 16)
        libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(BPF_OBJ_GET_INFO_BY_FD),
                     attr, ctypes.c_uint(16))
        return info.raw[PROG_INFO_NAME].split(b"\0")[0].decode() or f"prog{prog_id}"
    finally:
        os.close(fd)


def bpf_stats(pid):
    """name -> [runs, ns] over the BPF programs process `pid` holds."""
    stats = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
        if "prog_id" not in fields or "run_cnt" not in fields:
            continue
        name = bpf_prog_name(int(fields["prog_id"]))
        entry = stats.setdefault(name, [0, 0])
        entry[0] += int(fields["run_cnt"])
        entry[1] += int(fields["run_time_ns"])
    return stats


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def wait_until(what, check, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"timed out waiting for {what}")


class Agent:
    """A `pymem agent` on a free port, for one measurement."""

    def __init__(self, pymem, sample_bytes):
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        command = [pymem, "agent", "--listen", f"127.0.0.1:{port}", "--sample-interval",
                   "250ms", "--probe-delay", "0s", "--probe-budget", "0"]
        if sample_bytes is not None:
            command += ["--sample-bytes", sample_bytes]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_until("the agent", lambda: get_json(f"{self.base}/api/v1/processes") is not None)

    def process_info(self, pid):
        return get_json(f"{self.base}/api/v1/processes/{pid}")

    def wait_for_probes(self, pid):
        wait_until("the allocation probes",
                   lambda: self.process_info(pid)["accounting"] == "probes")

    def counters(self):
        """(BPF program stats, agent CPU seconds) now."""
        return bpf_stats(self.process.pid), cpu_seconds(self.process.pid)

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait()


def program_deltas(before, after):
    """name -> (runs, ns) between two bpf_stats readings."""
    deltas = {}
    for name, (runs, ns) in after.items():
        old_runs, old_ns = before.get(name, (0, 0))
        if runs > old_runs:
            deltas[name] = (runs - old_runs, ns - old_ns)
    return deltas


def run_loop(args, sample_bytes):
    agent = Agent(args.pymem, sample_bytes)
    workload = subprocess.Popen(
        [args.python, "-c", WORKLOAD, str(args.depth), str(args.blocks)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert workload.stdout.readline().strip() == "ready"
        agent.wait_for_probes(workload.pid)
        before_bpf, before_cpu = agent.counters()
        workload.stdin.write("go\n")
        workload.stdin.flush()
        loop = json.loads(workload.stdout.readline())
        time.sleep(1.0)  # the agent drains the ring buffer
        after_bpf, after_cpu = agent.counters()
    finally:
        workload.kill()
        workload.wait()
        agent.stop()
    return {
        "loop_seconds": loop["seconds"],
        "agent_cpu_seconds": after_cpu - before_cpu,
        "programs": program_deltas(before_bpf, after_bpf),
    }


def run_leak(args):
    """Stacks per second sites.py makes the default sampling capture (with
    the probe budget off, as everywhere here: the worst case)."""
    agent = Agent(args.pymem, None)
    workload = subprocess.Popen([args.python, "-u", str(REPO / "pymem-agent/tests/workloads/sites.py")],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert workload.stdout.readline().strip() == "ready"
        agent.wait_for_probes(workload.pid)
        before = agent.process_info(workload.pid)
        before_cpu = cpu_seconds(agent.process.pid)
        start = time.time()
        time.sleep(args.leak_seconds)
        after = agent.process_info(workload.pid)
        after_cpu = cpu_seconds(agent.process.pid)
        seconds = time.time() - start
    finally:
        workload.kill()
        workload.wait()
        agent.stop()

    def allocated(source):
        return (after["allocated_bytes_by_source"][source]
                - before["allocated_bytes_by_source"][source])

    # This process's own counts: the programs also run for other processes.
    minor = int(after["python_version"].split(".")[1])
    arena_size = (1 << 20) if minor >= 10 else (256 << 10)
    heap = after["heap_bytes"] - before["heap_bytes"]
    return {
        "seconds": seconds,
        "heap_growth_per_second": heap / seconds,
        "arena_stacks_per_second": allocated("arena") / arena_size / seconds,
        "sampled_stacks_per_second": allocated("raw") / (256 << 10) / seconds,
        "agent_cpu_share": (after_cpu - before_cpu) / seconds,
    }


def mean_ns(result, program):
    runs, ns = result["programs"].get(program, (0, 0))
    return ns / runs if runs else float("nan")


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def summarize(rounds):
    """Per mode: medians over the rounds of loop time, agent CPU and the
    mean run time of the stack-capturing program."""
    summary = {}
    for mode, _ in MODES:
        results = [r[mode] for r in rounds]
        summary[mode] = {
            "loop_seconds": median([r["loop_seconds"] for r in results]),
            "agent_cpu_seconds": median([r["agent_cpu_seconds"] for r in results]),
            "raw_alloc_ret_ns": median([mean_ns(r, "raw_alloc_ret") for r in results]),
            "raw_free_ns": median([mean_ns(r, "raw_free") for r in results]),
            "raw_alloc_ret_runs": median([r["programs"].get("raw_alloc_ret", (0, 0))[0]
                                          for r in results]),
        }
    return summary


def report(args, summary, leak):
    blocks = args.blocks
    print(f"Part 1: {blocks} x bytes(4096) at Python depth {args.depth}, {args.python}, "
          f"median of {args.rounds} rounds")
    print(f"{'mode':8} {'loop s':>8} {'agent cpu s':>12} {'raw_alloc_ret ns':>17} "
          f"{'raw_free ns':>12}")
    for mode, _ in MODES:
        m = summary[mode]
        print(f"{mode:8} {m['loop_seconds']:8.3f} {m['agent_cpu_seconds']:12.3f} "
              f"{m['raw_alloc_ret_ns']:17.0f} {m['raw_free_ns']:12.0f}")
    off, every = summary["off"], summary["every"]
    if every["raw_alloc_ret_runs"] > 1.1 * blocks:
        print(f"warning: {every['raw_alloc_ret_runs']} raw_alloc_ret runs for {blocks} "
              "allocations: other Python processes ran the probes too; figures are mixed")
    kernel_ns = every["raw_alloc_ret_ns"] - off["raw_alloc_ret_ns"]
    loop_ns = (every["loop_seconds"] - off["loop_seconds"]) / blocks * 1e9
    agent_ns = (every["agent_cpu_seconds"] - off["agent_cpu_seconds"]) / blocks * 1e9
    # nest() x depth, allocate(), <module>
    print(f"per captured stack ({args.depth + 2} Python frames):")
    print(f"  kernel, stack walk + map + event  {kernel_ns:8.0f} ns")
    print(f"  agent CPU, event handling         {agent_ns:8.0f} ns")
    print(f"  traced process, wall clock        {loop_ns:8.0f} ns")
    print()
    print(f"Part 2: tests/workloads/sites.py under the default agent for {leak['seconds']:.0f} s")
    stacks = leak["arena_stacks_per_second"] + leak["sampled_stacks_per_second"]
    print(f"  heap growth             {leak['heap_growth_per_second'] / (1 << 20):8.1f} MiB/s")
    print(f"  arena stacks            {leak['arena_stacks_per_second']:8.1f} /s")
    print(f"  sampled-block stacks    {leak['sampled_stacks_per_second']:8.1f} /s")
    print(f"  stack cost              {stacks * (kernel_ns + agent_ns) / 1e6:8.2f} ms/s "
          f"({stacks * (kernel_ns + agent_ns) / 1e7:.3f}% of a core)")
    print(f"  agent CPU, everything   {leak['agent_cpu_share'] * 100:8.1f} % of a core")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_pymem = REPO / "target/release/pymem"
    if not default_pymem.exists():
        default_pymem = REPO / "target/debug/pymem"
    parser.add_argument("--pymem", default=str(default_pymem))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--leak-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (BPF programs and their statistics)")
    stats_switch = Path("/proc/sys/kernel/bpf_stats_enabled")
    was_enabled = stats_switch.read_text().strip()
    stats_switch.write_text("1")
    try:
        rounds = [{mode: run_loop(args, sample_bytes) for mode, sample_bytes in MODES}
                  for _ in range(args.rounds)]
        leak = run_leak(args)
    finally:
        stats_switch.write_text(was_enabled)
    summary = summarize(rounds)
    if args.json:
        print(json.dumps({"rounds": rounds, "summary": summary, "leak": leak}, indent=2))
    report(args, summary, leak)


if __name__ == "__main__":
    main()
