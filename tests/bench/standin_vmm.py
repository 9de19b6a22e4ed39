#!/usr/bin/python3 -S
"""A stand-in for cloud-hypervisor, for tests and benchmarks where guest boot does not matter.

It is NOT a hypervisor: no guest runs. No cloud-hypervisor binary can run guests on this
host (no KVM that boots guests) and QEMU/TCG is far too heavy for the 50-100 machines of the
controller fault tests and the scale benchmark, so this process plays cloud-hypervisor's
part towards the agent: it takes the command line our driver builds
(``controller/agent/hypervisor/cloud_hypervisor.py``), serves cloud-hypervisor's REST API on
``--api-socket`` (HTTP/1.1 over a UNIX socket, keep-alive as its micro_http server does) and
exits like it. The agent runs it with ``--hypervisor cloud-hypervisor --vmm-binary PATH``.

What it does, as cloud-hypervisor does:

* ``--api-socket PATH | path=PATH | fd=N``: ``GET vmm.ping``, ``vm.info`` (state Running /
  Paused / Created, config echoing payload, cpus, memory, disks, net, fs, serial, console),
  ``vm.counters`` (zeroed counters keyed by the devices' ids: ``disk0``, ``net0``...);
  ``PUT vm.pause``, ``vm.resume``, ``vm.reboot``, ``vm.shutdown`` (VM stopped, process stays,
  ``vm.info`` then says Created), ``vm.boot``, ``vm.delete``, ``vm.power-button`` (the
  "guest" powers off: the process exits 0, as when a real guest powers off), ``vmm.shutdown``
  (200, then exit 0). 204 replies carry no Content-Length; a wrong verb is 400, an unknown
  endpoint 404, an action in the wrong state 500 (pre-v53 behaviour).
* SIGTERM / SIGINT: exit 0.
* ``--serial file=PATH`` appends console lines to PATH; ``--serial pty`` opens a pty (the
  slave in raw mode) whose path ``vm.info`` reports in ``config.serial.file``, and writes the
  console lines to it (dropped when nobody reads, like CH's ring buffer); a reboot makes a
  new pty as CH >= v40 does.
* ``--event-monitor path=PATH | fd=N``: pretty-printed JSON events ``{timestamp, source,
  event, properties}``: vmm/starting, vm/booting, vm/booted, vm/pausing, vm/paused,
  vm/resuming, vm/resumed, vm/rebooting, vm/rebooted, vm/shutdown, vm/deleted, vmm/shutdown.
* A payload file or disk that does not exist fails the start (exit 1), as CH's VM creation
  does.

What it does not do: it connects to no virtio-fs socket (virtiofsd is left alone, waiting),
opens no tap, reads no disk. The console carries two lines: that this is a stand-in, and,
with a direct-kernel payload and an initramfs (container mode), the line our initramfs
prints when it hands over to the entrypoint, so the agent's boot timer and the
controller's Ready condition move as with a real guest.

The process re-executes itself once so that its command line starts with this file's path,
as a real binary's does: the agent recognises its VMM by ``argv[0]``. Standard library
only, no asyncio, and ``-S``: it starts in milliseconds and stays at a few MB.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
import tty

TYPE_CHECKING = False  # importing typing (or pathlib) would cost MBs of RSS at run time
if TYPE_CHECKING:
    from typing import Any, BinaryIO

VERSION = "0.0-standin"
CONSOLE_LINES = (b"standin-vmm: a stand-in for cloud-hypervisor; no guest runs\r\n",)
# What the container-mode initramfs prints right before it starts the entrypoint.
HANDOVER_LINE = b"zm-init: switching root\r\n"
POWER_OFF_LINE = b"reboot: Power down\r\n"
# Flags that take no value.
SWITCHES = {"--no-shutdown", "-v", "-vv", "-vvv", "--pvpanic", "--landlock", "--version", "-V"}
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class StartError(Exception):
    """The command line cannot start a VM (CH prints the error and exits 1)."""


def reexec_as_binary() -> None:
    """Make /proc/<pid>/cmdline start with this file's path (see the module docstring)."""
    me = os.path.realpath(__file__)
    with open("/proc/self/cmdline", "rb") as f:
        argv0 = f.read().split(b"\0", 1)[0].decode()
    if argv0 == me:
        return
    # PYTHONHOME: with argv[0] not the interpreter, Python could not find its stdlib.
    env = {**os.environ, "PYTHONHOME": f"{sys.base_prefix}:{sys.base_exec_prefix}"}
    os.execve(sys.executable, [me, "-S", me, *sys.argv[1:]], env)


def parse_argv(argv: list[str]) -> dict[str, list[str]]:
    """Flag -> values: list flags (--disk, --net, --fs) take several values after one flag."""
    flags: dict[str, list[str]] = {}
    current = ""
    for arg in argv:
        if arg.startswith("-") and (arg.startswith("--") or arg in SWITCHES):
            current = arg
            flags.setdefault(arg, [])
            if arg in SWITCHES:
                current = ""
        elif current:
            flags[current].append(arg)
        else:
            raise StartError(f"unexpected argument {arg!r}")
    return flags


def options(value: str) -> dict[str, str]:
    """``key=value,key=value``; a bare word is ``{"": word}`` (``--serial pty``)."""
    out: dict[str, str] = {}
    for item in value.split(","):
        key, sep, val = item.partition("=")
        if sep:
            out[key] = val
        else:
            out[""] = key
    return out


def size_bytes(text: str) -> int:
    unit = UNITS.get(text[-1:].upper())
    return int(text[:-1]) * unit if unit else int(text)


def on(value: str | None) -> bool:
    return value in ("on", "true")


class VMM:
    def __init__(self, flags: dict[str, list[str]]) -> None:
        self.started = time.monotonic()
        self.flags = flags
        self.events: BinaryIO | None = self._event_monitor()
        self.event("vmm", "starting")
        self.config = self._config()
        self.state = "Running"
        self.serial_file: BinaryIO | None = None
        self.pty_master: int | None = None
        self.pty_slave: int | None = None
        self.exit_after_reply: int | None = None
        self.api = self._api_socket()
        self._open_serial()
        self.event("vm", "booting")
        self.console(*CONSOLE_LINES)
        payload = self.config["payload"]
        if payload.get("kernel") and payload.get("initramfs"):
            self.console(HANDOVER_LINE)
        self.event("vm", "booted")

    # ------------------------------------------------------------------ setup

    def _one(self, flag: str) -> str | None:
        values = self.flags.get(flag)
        return values[0] if values else None

    def _event_monitor(self) -> BinaryIO | None:
        value = self._one("--event-monitor")
        if value is None:
            return None
        opts = options(value)
        if "fd" in opts:
            return os.fdopen(int(opts["fd"]), "wb", buffering=0)
        return open(opts.get("path") or opts[""], "wb", buffering=0)

    def _api_socket(self) -> socket.socket:
        value = self._one("--api-socket")
        if value is None:
            raise StartError("no --api-socket: a stand-in without an API is of no use")
        opts = options(value)
        if "fd" in opts:
            return socket.socket(fileno=int(opts["fd"]))
        path = opts.get("path") or opts[""]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            raise StartError(f"Error binding the API socket {path}: {exc}") from exc
        sock.listen(16)
        return sock

    def _config(self) -> dict[str, Any]:
        payload = {
            key: self._one(f"--{key}")
            for key in ("kernel", "initramfs", "cmdline", "firmware")
            if self._one(f"--{key}") is not None
        }
        if not payload.get("kernel") and not payload.get("firmware"):
            raise StartError("a VM needs a payload: --kernel or --firmware")
        cpus = options(self._one("--cpus") or "boot=1")
        memory = options(self._one("--memory") or "size=512M")
        disks = [options(v) for v in self.flags.get("--disk", [])]
        for path in [payload.get(k) for k in ("kernel", "initramfs", "firmware")] + [
            d.get("path") for d in disks
        ]:
            if path and not os.path.exists(path):
                raise StartError(f"Error booting VM: cannot open {path}: No such file")
        boot = int(cpus.get("boot", "1"))
        return {
            "payload": payload,
            "cpus": {"boot_vcpus": boot, "max_vcpus": int(cpus.get("max", boot))},
            "memory": {
                "size": size_bytes(memory.get("size", "512M")),
                "shared": on(memory.get("shared")),
                "hugepages": on(memory.get("hugepages")),
            },
            "disks": [
                {"path": d.get("path"), "readonly": on(d.get("readonly")), "id": d.get("id")}
                for d in disks
            ],
            "net": [
                {"tap": n.get("tap"), "mac": n.get("mac"), "id": n.get("id")}
                for n in map(options, self.flags.get("--net", []))
            ],
            "fs": [
                {
                    "tag": f.get("tag"),
                    "socket": f.get("socket"),
                    "id": f.get("id"),
                    "num_queues": 1,
                    "queue_size": 1024,
                }
                for f in map(options, self.flags.get("--fs", []))
            ],
            "serial": self._console_config(self._one("--serial") or "null"),
            "console": self._console_config(self._one("--console") or "tty"),
        }

    @staticmethod
    def _console_config(value: str) -> dict[str, Any]:
        opts = options(value)
        for mode in ("file", "socket"):
            if mode in opts:
                return {"mode": mode.capitalize(), "file": opts[mode] if mode == "file" else None,
                        "socket": opts[mode] if mode == "socket" else None}  # fmt: skip
        return {"mode": opts.get("", "null").capitalize(), "file": None, "socket": None}

    def _open_serial(self) -> None:
        serial = self.config["serial"]
        if serial["mode"] == "File":
            self.serial_file = open(serial["file"], "ab", buffering=0)  # noqa: SIM115
        elif serial["mode"] == "Pty":
            self.pty_master, self.pty_slave = os.openpty()
            tty.setraw(self.pty_slave)
            os.set_blocking(self.pty_master, False)
            serial["file"] = os.ttyname(self.pty_slave)

    # ------------------------------------------------------------------ output

    def console(self, *lines: bytes) -> None:
        data = b"".join(lines)
        if self.serial_file is not None:
            self.serial_file.write(data)
        elif self.pty_master is not None:
            # Nobody reads and the buffer is full: dropped, as by CH's ring buffer.
            with contextlib.suppress(BlockingIOError):
                os.write(self.pty_master, data)
        elif self.config["serial"]["mode"] == "Tty":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

    def event(self, source: str, name: str, properties: dict[str, str] | None = None) -> None:
        if self.events is None:
            return
        elapsed = time.monotonic() - self.started
        record = {
            "timestamp": {"secs": int(elapsed), "nanos": int(elapsed % 1 * 1e9)},
            "source": source,
            "event": name,
            "properties": properties,
        }
        try:
            self.events.write(json.dumps(record, indent=2).encode() + b"\n")
        except BrokenPipeError:
            self.events = None  # the reader went away; CH keeps running too

    # ------------------------------------------------------------------ API

    def handle(self, method: str, path: str) -> tuple[int, Any]:
        """(HTTP status, JSON body or None) for one request."""
        endpoint = path.removeprefix("/api/v1/")
        getters = {"vmm.ping": self.ping, "vm.info": self.info, "vm.counters": self.counters}
        actions = {
            "vm.pause": self.pause,
            "vm.resume": self.resume,
            "vm.reboot": self.reboot,
            "vm.shutdown": self.shutdown,
            "vm.boot": self.boot,
            "vm.delete": self.delete,
            "vm.power-button": self.power_button,
            "vmm.shutdown": self.vmm_shutdown,
        }
        if not path.startswith("/api/v1/") or endpoint not in getters | actions:
            return 404, None
        if (method == "GET") != (endpoint in getters):
            return 400, [f"Wrong method {method} for {endpoint}"]
        if endpoint in getters:
            return getters[endpoint]()
        return actions[endpoint]()

    def ping(self) -> tuple[int, Any]:
        return 200, {
            "build_version": f"v{VERSION}",
            "version": VERSION,
            "pid": os.getpid(),
            "features": [],
        }

    def info(self) -> tuple[int, Any]:
        if self.state == "Deleted":
            return 404, ["VM is not created"]
        return 200, {
            "config": self.config,
            "state": self.state,
            "memory_actual_size": self.config["memory"]["size"],
        }

    def counters(self) -> tuple[int, Any]:
        if self.state in ("Created", "Deleted"):
            return 500, ["VM is not running"]
        zero_disk = ("read_bytes", "write_bytes", "read_ops", "write_ops")
        zero_net = ("rx_bytes", "rx_frames", "tx_bytes", "tx_frames")
        out: dict[str, dict[str, int]] = {}
        for kind, names in (("disks", zero_disk), ("net", zero_net)):
            for i, dev in enumerate(self.config[kind]):
                out[dev["id"] or f"_{kind}{i}"] = dict.fromkeys(names, 0)
        return 200, out

    def _transition(self, want: str, to: str, source_event: tuple[str, str]) -> tuple[int, Any]:
        if self.state != want:
            return 500, [f"VM is {self.state}, not {want}"]
        self.event("vm", source_event[0])
        self.state = to
        self.event("vm", source_event[1])
        return 204, None

    def pause(self) -> tuple[int, Any]:
        return self._transition("Running", "Paused", ("pausing", "paused"))

    def resume(self) -> tuple[int, Any]:
        return self._transition("Paused", "Running", ("resuming", "resumed"))

    def boot(self) -> tuple[int, Any]:
        return self._transition("Created", "Running", ("booting", "booted"))

    def reboot(self) -> tuple[int, Any]:
        if self.state not in ("Running", "Paused"):
            return 500, [f"VM is {self.state}, cannot reboot"]
        self.event("vm", "rebooting")
        if self.pty_master is not None:  # CH >= v40 re-creates its consoles on a reboot
            old = [self.pty_master, self.pty_slave]
            self._open_serial()  # before closing the old one, so the path really changes
            for fd in old:
                if fd is not None:
                    os.close(fd)
        self.state = "Running"
        self.console(*CONSOLE_LINES)
        self.event("vm", "rebooted")
        return 204, None

    def shutdown(self) -> tuple[int, Any]:
        if self.state not in ("Running", "Paused"):
            return 500, [f"VM is {self.state}, cannot shut down"]
        self.state = "Created"  # what CH's vm.info says once the VM object is dropped
        self.event("vm", "shutdown")
        return 204, None

    def delete(self) -> tuple[int, Any]:
        self.state = "Deleted"
        self.event("vm", "deleted")
        return 204, None

    def power_button(self) -> tuple[int, Any]:
        """The "guest" answers the ACPI button by powering off; CH then exits 0."""
        if self.state != "Running":
            return 500, [f"VM is {self.state}, cannot press its power button"]
        self.console(POWER_OFF_LINE)
        self.state = "Created"
        self.event("vm", "shutdown")
        if "--no-shutdown" not in self.flags:
            self.exit_after_reply = 0
        return 204, None

    def vmm_shutdown(self) -> tuple[int, Any]:
        self.exit_after_reply = 0
        return 200, None

    def exit(self, code: int) -> None:
        self.event("vmm", "shutdown")
        # The kernel hands what we wrote to the PTY's reader asynchronously; closing our side
        # first would drop the last console lines (the guest's power-off line among them).
        time.sleep(0.2)
        sys.exit(code)


class Connection:
    """One API client; requests are served in order, the connection kept alive unless the
    client asks to close it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def requests(self) -> list[tuple[str, str, bool]]:
        """Complete requests in the buffer: (method, path, close after reply)."""
        out = []
        while b"\r\n\r\n" in self.buf:
            head, rest = self.buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:])
            }
            length = int(headers.get("content-length", "0"))
            if len(rest) < length:
                break
            self.buf = rest[length:]
            method, path, *_ = lines[0].split(" ")
            out.append((method, path, headers.get("connection", "").lower() == "close"))
        return out


REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 500: "Error"}


def response(status: int, body: Any, close: bool) -> bytes:
    head = [f"HTTP/1.1 {status} {REASONS[status]}", "Server: Cloud Hypervisor API"]
    if close:
        head.append("Connection: close")
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
    elif status not in (200, 204):
        head.append("Content-Length: 0")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def serve(vmm: VMM) -> None:
    sel = selectors.DefaultSelector()
    sel.register(vmm.api, selectors.EVENT_READ)
    conns: dict[socket.socket, Connection] = {}
    while True:
        for key, _ in sel.select():
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock is vmm.api:
                client, _ = vmm.api.accept()
                conns[client] = Connection(client)
                sel.register(client, selectors.EVENT_READ)
                continue
            conn = conns[sock]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            conn.buf += data
            close = not data
            for method, path, wants_close in conn.requests():
                status, body = vmm.handle(method, path)
                last = wants_close or vmm.exit_after_reply is not None
                # A 200 without a body has no length: the client reads to EOF, so close.
                last = last or (status == 200 and body is None)
                try:
                    sock.sendall(response(status, body, last))
                except OSError:
                    last = True
                if vmm.exit_after_reply is not None:
                    sock.close()
                    vmm.exit(vmm.exit_after_reply)
                if last:
                    close = True
                    break
            if close:
                sel.unregister(sock)
                sock.close()
                del conns[sock]


def main() -> int:
    flags = parse_argv(sys.argv[1:])
    if "--version" in flags or "-V" in flags:
        print(f"standin-vmm v{VERSION}")
        return 0
    try:
        vmm = VMM(flags)
    except (StartError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: object) -> None:
        vmm.exit(0)  # CH's SIGTERM/SIGINT path: VM torn down, exit status 0

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serve(vmm)
    return 0


if __name__ == "__main__":
    reexec_as_binary()
    sys.exit(main())
