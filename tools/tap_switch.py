"""A userspace Ethernet switch with an added one-way delay, for kernels without
`tc netem`: one TAP device per host namespace, every frame held `delay` before it
is delivered (to the port that owns its destination MAC, else to every other
port), so TCP, the ring backend and mDNS all see the delay.

    with TapLab(3, logdir, delay_file) as lab:   # like tests/netns.py's NetnsLab
        lab.set_delay(0.5)                       # ms, one way; read by the switch
Run as a script inside the hub namespace, it is the switch itself."""

from __future__ import annotations

import fcntl
import heapq
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import netns  # noqa: E402

TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def switch_main(hosts: list[str], ips: list[str], delay_file: str) -> None:
    fds = []
    for i, (ns, ip) in enumerate(zip(hosts, ips)):
        fds.append(open_tap(f"tp{i}"))
        for cmd in (["link", "set", f"tp{i}", "netns", ns], ["-n", ns, "addr", "add", f"{ip}/24", "dev", f"tp{i}"],
                    ["-n", ns, "link", "set", f"tp{i}", "up", "multicast", "on"],
                    ["-n", ns, "route", "add", "224.0.0.0/4", "dev", f"tp{i}"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
    Path(delay_file + ".ready").write_text("1")
    owner: dict[bytes, int] = {}  # MAC -> port
    queue: list = []  # (due, seq, port, frame)
    delay, checked, seq = 0.0, 0.0, 0
    while True:
        now = time.monotonic()
        if now - checked > 0.2:
            try:
                delay = float(Path(delay_file).read_text()) / 1e3
            except (OSError, ValueError):
                pass
            checked = now
        while queue and queue[0][0] <= now:
            _, _, port, frame = heapq.heappop(queue)
            try:
                os.write(fds[port], frame)
            except OSError:
                pass
        wait = max(0.0, queue[0][0] - now) if queue else 0.2
        ready, _, _ = select.select(fds, [], [], min(wait, 0.2))
        for fd in ready:
            src = fds.index(fd)
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                owner[frame[6:12]] = src
                dst = owner.get(frame[0:6]) if not frame[0] & 1 else None  # multicast bit: flood
                due = time.monotonic() + delay
                for port in ([dst] if dst is not None else [p for p in range(len(fds)) if p != src]):
                    seq += 1
                    if delay <= 0:
                        os.write(fds[port], frame)
                    else:
                        heapq.heappush(queue, (due, seq, port, frame))


class TapLab(netns.NetnsLab):
    """NetnsLab's hosts on the userspace switch instead of a bridge."""

    def __init__(self, n_hosts: int, logdir, delay_file: Path, prefix: str | None = None):
        super().__init__(n_hosts, logdir, prefix)
        self.delay_file = Path(delay_file)

    def up(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.set_delay(0.0)
        for ns in [self.hub, *self.hosts]:
            netns._ip("netns", "add", ns)
            self._made.append(ns)
            netns._ip("-n", ns, "link", "set", "lo", "up")
        ready = Path(str(self.delay_file) + ".ready")
        ready.unlink(missing_ok=True)
        self.switch = subprocess.Popen(["ip", "netns", "exec", self.hub, sys.executable, __file__, ",".join(self.hosts),
                                        ",".join(self.ips), str(self.delay_file)], start_new_session=True,
                                       stdout=open(self.logdir / "switch.log", "wb"), stderr=subprocess.STDOUT)
        self.procs.append(self.switch)
        deadline = time.time() + 20
        while not ready.exists():
            if self.switch.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"tap switch failed: {self.log('switch.log')}")
            time.sleep(0.05)

    def set_delay(self, ms: float) -> None:
        self.delay_file.write_text(str(ms))
        time.sleep(0.3)  # the switch reads it every 0.2 s


if __name__ == "__main__":
    switch_main(sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3])
