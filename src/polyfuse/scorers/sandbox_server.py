"""The program that runs inside the sandbox: it limits itself, then runs the candidate and answers the
scorer over the channel (fd 3) in one of two protocols.

- `serve`: requests `["load", program]`, `["resolve", names]`, `["call", name, args, kwargs]`, each
  answered `["ok", value]` or `["raise", type name, message]`, until the scorer closes the channel;
- `script`: one `["load", program]`, then the channel is closed and the program runs as `__main__` with
  the scorer's stdin (stdin/stdout tests); its exit status is the answer.

Isolation is a separate setting: under bubblewrap the namespaces are already made; `unsafe_local` asks
the server to cut its own network (`cut_network`) before anything else, whatever the protocol.

Only the standard library and `sandbox_wire` are used: the scorer sends the sources of both as the
interpreter's `-c` program (`sandbox.py`), so nothing of polyfuse is mounted in the sandbox.
"""

import builtins
import json
import os
import resource
import sys

from polyfuse.scorers.sandbox_wire import decode_length, encode_message, from_wire, to_wire

_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000


def cut_network() -> None:
    """Enter an empty network namespace (loopback only): directly with CAP_SYS_ADMIN, else inside a new
    user namespace that maps the user to itself (so files keep their owner). Raises if the kernel refuses."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWNET) == 0:
        return
    if libc.unshare(_CLONE_NEWNET | _CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) refused")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as file:
            file.write(text)


def set_limits(limits: dict[str, int]) -> None:
    """Per-process rlimits (`{"AS": bytes, "CPU": s, ...}`) and no core dumps; limits the kernel will not
    lower are left as they are (the cgroup and the scorer's deadline still hold)."""
    for name, value in {**limits, "CORE": 0}.items():
        try:
            resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
        except (ValueError, OSError):
            pass


def _read(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(3, n - len(data))
        if not chunk:
            raise SystemExit(0)
        data += chunk
    return data


def _receive() -> list:
    return from_wire(_read(decode_length(_read(4))).decode("ascii"))


def _send(message: list) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    data = encode_message(message)
    while data:
        data = data[os.write(3, data):]


def _failure(err: BaseException) -> list:
    try:
        text = str(err)[:2000]
    except BaseException:  # noqa: BLE001 - a candidate's __str__ may raise anything
        text = ""
    return ["raise", type(err).__name__, text]


def _run(program: str, namespace: dict) -> None:
    """The candidate's top level, as `main.py` in the working directory (tracebacks show its lines)."""
    with open("main.py", "w", encoding="utf-8") as file:
        file.write(program)
    exec(compile(program, "main.py", "exec"), namespace)


def _resolve(names: list, namespace: dict) -> dict:
    found = {}
    for name in names:
        if name not in namespace:
            found[name] = ("missing",)
        elif callable(namespace[name]):
            found[name] = ("callable",)
        else:
            try:
                to_wire(namespace[name])
                found[name] = ("value", namespace[name])
            except TypeError as err:
                found[name] = ("unsupported", str(err))
    return found


def serve(namespace: dict) -> None:
    """Answer the scorer's requests until it closes the channel."""
    while True:
        request = _receive()
        try:
            if request[0] == "load":
                _run(request[1], namespace)
                reply = None
            elif request[0] == "resolve":
                reply = to_wire(_resolve(request[1], namespace))
            else:
                reply = to_wire(namespace[request[1]](*request[2], **request[3]))
        except BaseException as err:  # noqa: BLE001 - whatever the candidate raised is its answer
            _send(_failure(err))
            continue
        _send(["ok", reply])


def script(namespace: dict) -> None:
    """Run the one program sent as `__main__` with the scorer's stdin, then exit."""
    program = _receive()[1]
    os.close(3)
    _run(program, namespace)
    raise SystemExit(0)


PROTOCOLS = {"serve": serve, "script": script}


def main(settings_json: str) -> None:
    """`settings_json`: {"protocol", "channel_fd", "cut_network", "limits", "site_dirs"} (see sandbox.py)."""
    settings = json.loads(settings_json)
    if settings["cut_network"]:
        cut_network()
    set_limits(settings["limits"])
    # -S skipped the site module's start-up work (.pth files: most of an interpreter's start-up time); the
    # installed packages stay importable.
    sys.path += [d for d in settings["site_dirs"] if os.path.isdir(d) and d not in sys.path]
    if settings["channel_fd"] != 3:
        os.dup2(settings["channel_fd"], 3)
    os.closerange(4, 1 << 16)
    sys.argv = ["main.py"]
    PROTOCOLS[settings["protocol"]]({"__name__": "__main__", "__builtins__": builtins})
