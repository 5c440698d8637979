#!/usr/bin/env python3
"""Small measuring helpers for bench/run (stdlib only; see bench/README.md).

Subcommands:
  freeport                      print a free TCP port on 127.0.0.1
  wait-http URL [--timeout S] [--pid PID]
                                poll URL (GET) until it answers 200; exit 1 on time-out, or
                                as soon as PID has exited
  post URL BODY_FILE            POST the file as JSON once; print the status, exit 0 on 200
  startup --system NAME --url URL --log FILE -- CMD...
                                start CMD, time start -> first 200 from URL with a fine timer,
                                stop CMD again; print one JSON line
  mem PID [--tree]              print resident memory of PID (and its same-named descendants)
  watch-mem PID --duration S [--tree]
                                sample memory every 20 ms for S seconds; print the maxima
  cpu-busy [--seconds S]        print how busy the CPUs are (percent of all CPUs, 0-100)
  cpu-account SELF PID          print a snapshot for `foreign`: CPU ticks of the machine, and
                                of SELF (own + reaped children) and PID's whole process tree
  foreign BEFORE AFTER          percent of the CPUs used by other processes between snapshots
  cpu-split BEFORE AFTER --machine-ticks N
                                CPU time between two cpu-account snapshots as JSON: the whole
                                machine's (N ticks, read by the caller right around the load) and
                                the gateway's own (PID's tree, handlers excluded), and that of
                                hookrunner's store threads (the history's writer and pruner)
  summary JSON [JSON]           one human line about a result line (and a settle line)
  settle PID COUNT_FILE [--timeout S]
                                wait until PID has no child processes left and COUNT_FILE
                                stops growing; print how many lines it holds
Every request goes to the loopback address the caller names; every loop is bounded in time.
"""

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse


def http(url, method="GET", body=b"", timeout=2.0, headers=()):
    """One HTTP/1.1 request on a fresh connection (https too), with extra `headers` ("Name: value");
    returns (status, body)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"probe.py: refusing non-loopback address {host}")
    path = parts.path or "/"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        + "".join(f"{h}\r\n" for h in headers) + "\r\n"
    ).encode()
    with socket.create_connection((host, port), timeout=timeout) as raw_conn:
        conn = raw_conn
        if parts.scheme == "https":
            # The harness's own certificate on loopback: it measures, it does not authenticate.
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            conn = context.wrap_socket(raw_conn, server_hostname=host)
        conn.sendall(head + body)
        chunks = []
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    status_line, _, rest = raw.partition(b"\r\n")
    fields = status_line.split()
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/"):
        raise OSError(f"not an HTTP answer: {status_line[:80]!r}")
    return int(fields[1]), rest.partition(b"\r\n\r\n")[2]


def cmd_freeport(_args):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        print(sock.getsockname()[1])


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command name, or None if PID is gone. Index 0 is the
    state (field 3 of stat(5)), so field N of stat(5) is at index N - 3."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def exited(pid):
    """True once pid is gone or a zombie (a server that exited stays one until reaped)."""
    fields = stat_fields(pid)
    return fields is None or fields[0] == b"Z"


def cmd_wait_http(args):
    deadline = time.monotonic() + args.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if args.pid and exited(args.pid):
            print(f"probe.py: process {args.pid} exited before {args.url} answered",
                  file=sys.stderr)
            return 1
        try:
            status, _ = http(args.url, timeout=1.0)
            if status == 200:
                return 0
            last = f"status {status}"
        except OSError as err:
            last = str(err)
        time.sleep(0.01)
    print(f"probe.py: {args.url} not ready after {args.timeout}s ({last})", file=sys.stderr)
    return 1


def cmd_post(args):
    with open(args.body_file, "rb") as f:
        body = f.read()
    try:
        status, answer = http(args.url, method="POST", body=body, timeout=args.timeout,
                              headers=args.header)
    except OSError as err:
        print(f"error: {err}")
        return 1
    print(status, answer[:200].decode(errors="replace").strip())
    return 0 if status in (200, 202) else 1


def stop(proc, grace=5.0):
    """SIGTERM, then SIGKILL after `grace` seconds; the whole process group either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stray children, if any
    except ProcessLookupError:
        pass


def cmd_startup(args):
    result = {"kind": "startup", "system": args.system}
    with open(args.log, "ab") as log:
        began = time.perf_counter()
        proc = subprocess.Popen(
            args.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        try:
            deadline = time.monotonic() + args.timeout
            ready = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    status, _ = http(args.url, timeout=1.0)
                    if status == 200:
                        ready = time.perf_counter()
                        break
                except OSError:
                    pass
                time.sleep(0.0002)
        finally:
            stop(proc)
    if ready is None:
        result["error"] = f"not ready within {args.timeout}s (exit status {proc.returncode})"
    else:
        result["ms"] = round((ready - began) * 1000.0, 3)
    print(json.dumps(result))
    return 0 if ready is not None else 1


def status_fields(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def kib(value):
    return int(value.split()[0]) if value else 0


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return kib(line.partition(":")[2])
    except OSError:
        pass
    return 0


def tree(root):
    """root and those of its descendants that run the same program (not the handlers)."""
    try:
        name = status_fields(root)["Name"]
    except OSError:
        return []
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = status_fields(entry)
            except OSError:
                continue
            parents[int(entry)] = (int(fields.get("PPid", "0")), fields.get("Name"))
    members, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, pname) in parents.items():
            if ppid == parent and pname == name:
                members.append(pid)
                frontier.append(pid)
    return members


def measure(pid, whole_tree):
    pids = tree(pid) if whole_tree else [pid]
    rss = hwm = pss = anon = 0
    counted = 0
    for p in pids:
        try:
            fields = status_fields(p)
        except OSError:
            continue
        rss += kib(fields.get("VmRSS"))
        hwm += kib(fields.get("VmHWM"))
        anon += kib(fields.get("RssAnon"))
        pss += pss_kib(p)
        counted += 1
    # RssAnon (heap, stacks) apart from the rest: mostly the program's code pages, clean and shared
    # with the page cache, which the kernel maps 64 KiB around each page first touched.
    return {"rss_kib": rss, "hwm_kib": hwm, "pss_kib": pss, "anon_kib": anon, "processes": counted}


def cmd_mem(args):
    print(json.dumps(measure(args.pid, args.tree)))


def cmd_watch_mem(args):
    peak = {"rss_kib": 0, "pss_kib": 0, "processes": 0}
    deadline = time.monotonic() + args.duration
    while time.monotonic() < deadline:
        now = measure(args.pid, args.tree)
        for key in peak:
            peak[key] = max(peak[key], now[key])
        time.sleep(0.02)
    final = measure(args.pid, args.tree)
    print(json.dumps({"peak_rss_kib": peak["rss_kib"], "peak_pss_kib": peak["pss_kib"],
                      "peak_processes": peak["processes"], "hwm_kib": final["hwm_kib"]}))


def has_children(pid):
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name, which may itself hold spaces or parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            return True
    return False


def count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def cmd_settle(args):
    began = time.monotonic()
    deadline = began + args.timeout
    last, stable_since = -1, time.monotonic()
    settled = False
    while time.monotonic() < deadline:
        count = count_lines(args.count_file)
        if count != last:
            last, stable_since = count, time.monotonic()
        elif not has_children(args.pid) and time.monotonic() - stable_since >= 0.5:
            settled = True
            break
        time.sleep(0.05)
    print(json.dumps({"ran": count_lines(args.count_file), "settled": settled,
                      "settle_s": round(time.monotonic() - began, 3)}))


def cmd_fsync_ceiling(args):
    """What one thread manages durably without a database: per event, write the payload to a new file,
    fsync it, rename it into place and fsync the directory."""
    with open(args.payload, "rb") as f:
        body = f.read()
    os.makedirs(args.dir, exist_ok=True)
    dir_fd = os.open(args.dir, os.O_RDONLY | os.O_DIRECTORY)
    n, began = 0, time.monotonic()
    try:
        while time.monotonic() - began < args.duration:
            tmp = os.path.join(args.dir, f".{n}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(args.dir, str(n)))
            os.fsync(dir_fd)
            n += 1
    finally:
        os.close(dir_fd)
    elapsed = time.monotonic() - began
    for name in os.listdir(args.dir):
        os.unlink(os.path.join(args.dir, name))
    print(json.dumps({"events": n, "duration_s": round(elapsed, 3), "rate": round(n / elapsed, 1)}))


def cpu_times():
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def cmd_cpu_busy(args):
    total0, idle0 = cpu_times()
    time.sleep(args.seconds)
    total1, idle1 = cpu_times()
    busy = 100.0 * (1 - (idle1 - idle0) / max(total1 - total0, 1))
    print(f"{busy:.0f}")


def proc_ticks(pid, with_children=True):
    """utime + stime (+ cutime + cstime: children already reaped) of one process, in ticks."""
    fields = stat_fields(pid)
    if fields is None:
        return 0
    ticks = int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def descendants(root):
    parents = {}
    for entry in os.listdir("/proc"):
        fields = stat_fields(entry) if entry.isdigit() else None
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))  # ppid, field 4
    found, frontier = [], [root]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def own_ticks(pid):
    """(start time, utime + stime) of one process: its own threads only, no reaped children."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return int(fields[19]), int(fields[11]) + int(fields[12])  # starttime is field 22


# The store's threads (the writer of the history and the queue, and the pruner); the kernel cuts a
# thread's name to 15 bytes.
STORE_THREADS = ("hookrunner-stor", "hookrunner-prun")


def thread_cpu_ms(pid, names):
    """CPU time of PID's threads with one of these names, in ms: from /proc/PID/task/TID/sched
    (nanoseconds, where the kernel has scheduler debugging), else from the tick counts of stat."""
    total = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().strip() not in names:
                    continue
        except OSError:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/sched") as f:
                runtime = [line for line in f if line.startswith("se.sum_exec_runtime")]
            total += float(runtime[0].split(":")[1])
        except (OSError, IndexError, ValueError):
            fields = stat_fields(f"{pid}/task/{tid}")
            if fields is not None:
                total += (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")
    return total


def cmd_cpu_account(args):
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    busy = cpu[0] + cpu[1] + cpu[2] + (cpu[7] if len(cpu) > 7 else 0)  # user nice system steal
    ours = proc_ticks(args.self_pid)
    snapshot = []
    if args.pid:
        tree = [args.pid] + descendants(args.pid)
        ours += sum(proc_ticks(p) for p in tree)
        for p in tree:
            own = own_ticks(p)
            if own:
                snapshot.append(f"{p}/{own[0]}/{own[1]}")
    store = thread_cpu_ms(args.pid, STORE_THREADS) if args.pid else None
    store = "" if store is None else f"{store:.3f}"
    print(f"{busy}:{ours}:{time.monotonic():.3f}:{','.join(snapshot)}:{store}")


def cmd_cpu_split(args):
    """The gateway's CPU is summed over the processes of its tree that lived through both
    snapshots (same pid and start time): its workers, not the short-lived handlers."""
    def parse(snapshot):
        procs = {}
        for item in filter(None, snapshot.split(":")[3].split(",")):
            pid, start, ticks = item.split("/")
            procs[(pid, start)] = int(ticks)
        return procs
    procs0, procs1 = parse(args.before), parse(args.after)
    gateway = sum(t - procs0[k] for k, t in procs1.items() if k in procs0)
    ms = 1000.0 / os.sysconf("SC_CLK_TCK")
    out = {"machine_cpu_ms": round(args.machine_ticks * ms)}
    if procs0 and procs1:
        out["gateway_cpu_ms"] = round(gateway * ms)
    # The store's threads live as long as the server, so the difference is theirs alone.
    store0, store1 = (s.split(":")[4] if s.count(":") >= 4 else "" for s in (args.before, args.after))
    if store0 and store1:
        out["store_cpu_ms"] = round(float(store1) - float(store0), 3)
    print(json.dumps(out))


def cmd_foreign(args):
    (busy0, ours0, t0), (busy1, ours1, t1) = (
        map(float, s.split(":")[:3]) for s in (args.before, args.after))
    capacity = (t1 - t0) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
    foreign = max(0, (busy1 - busy0) - (ours1 - ours0))
    print(f"{min(100.0, 100.0 * foreign / capacity):.0f}" if capacity > 0 else "0")


def cmd_summary(args):
    r = json.loads(args.result)
    if "rss_kib" in r:
        print(f"idle RSS {r['rss_kib']} KiB, PSS {r['pss_kib']} KiB, {r['processes']} process(es)")
        return
    if "peak_rss_kib" in r:
        print(f"peak RSS {r['peak_rss_kib']} KiB (VmHWM {r['hwm_kib']} KiB), "
              f"peak PSS {r['peak_pss_kib']} KiB, up to {r['peak_processes']} process(es)")
        return
    if args.settle:
        s = json.loads(args.settle)
        acked = sum(n for code, n in r["statuses"].items() if code.startswith("2"))
        print(f"{acked / r['duration_s']:8.1f} acks/s, acked {acked}, ran {s['ran']} "
              f"(settled={s['settled']} after {s['settle_s']} s)")
        return
    rate = r.get("runs_per_s", r.get("rps", 0.0))
    bad = r.get("failures", 0) + sum(r.get("errors", {}).values())
    line = f"{rate:8.1f}/s  p50 {r['p50_us'] / 1000:7.2f} ms  p99 {r['p99_us'] / 1000:7.2f} ms"
    if bad:
        line += f"  ERRORS: {bad} {json.dumps(r.get('errors'))} statuses {json.dumps(r.get('statuses'))}"
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("freeport").set_defaults(func=cmd_freeport)
    p = sub.add_parser("wait-http")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--pid", type=int)
    p.set_defaults(func=cmd_wait_http)
    p = sub.add_parser("post")
    p.add_argument("url")
    p.add_argument("body_file")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--header", action="append", default=[], help='"Name: value", repeatable')
    p.set_defaults(func=cmd_post)
    p = sub.add_parser("startup")
    p.add_argument("--system", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("cmd", nargs="+")
    p.set_defaults(func=cmd_startup)
    p = sub.add_parser("mem")
    p.add_argument("pid", type=int)
    p.add_argument("--tree", action="store_true")
    p.set_defaults(func=cmd_mem)
    p = sub.add_parser("watch-mem")
    p.add_argument("pid", type=int)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--tree", action="store_true")
    p.set_defaults(func=cmd_watch_mem)
    p = sub.add_parser("cpu-busy")
    p.add_argument("--seconds", type=float, default=2.0)
    p.set_defaults(func=cmd_cpu_busy)
    p = sub.add_parser("cpu-account")
    p.add_argument("self_pid", type=int)
    p.add_argument("pid", type=int, nargs="?")
    p.set_defaults(func=cmd_cpu_account)
    p = sub.add_parser("foreign")
    p.add_argument("before")
    p.add_argument("after")
    p.set_defaults(func=cmd_foreign)
    p = sub.add_parser("cpu-split")
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--machine-ticks", type=int, required=True)
    p.set_defaults(func=cmd_cpu_split)
    p = sub.add_parser("summary")
    p.add_argument("result")
    p.add_argument("settle", nargs="?")
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("fsync-ceiling")
    p.add_argument("dir")
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--payload", required=True)
    p.set_defaults(func=cmd_fsync_ceiling)
    p = sub.add_parser("settle")
    p.add_argument("pid", type=int)
    p.add_argument("count_file")
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=cmd_settle)
    args = parser.parse_args()
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
