"""Running model-written Python programs under limits, one child process each: `run_in_sandbox`, `run_many`.

Whatever a program does (loops, allocates, forks, writes, connects, exits) comes back as a `SandboxResult`, a
failed attempt, never as an exception in the caller. Linux only. What holds a program in, and by what:

Kernel, on every Linux machine:
  - a fresh `python -I` interpreter in its own session, killed with its whole process group at the wall-clock
    timeout and again once it has exited (leftover children);
  - rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS: a large allocation is a MemoryError), the size of
    every file it writes (RLIMIT_FSIZE, its captured stdout and stderr included, so 1 GB of output stops at the cap
    and is never read back whole), no core files, and processes (RLIMIT_NPROC, set to its user's tasks now plus a
    margin, as it counts them all; the kernel exempts root from it);
  - cwd, HOME and TMPDIR in a temporary folder that is removed afterwards;
  - no capabilities, and no regaining them through exec (no_new_privs; an empty bounding set where the
    process had capabilities to drop, i.e. as root or in its own user namespace).

Kernel, where this process may create namespaces (root, or unprivileged user namespaces; `kernel_isolation()`
says which), on top of the above:
  - a network namespace with only a down loopback: no network at all;
  - a mount namespace where the whole filesystem is read-only and the program's folder is a fresh tmpfs of
    `disk_mb`: it cannot write, delete or rename anything outside, nor fill the disk;
  - a PID namespace whose init is the sandbox's: when the program ends or is killed, every process it started
    dies with it, also those that left its process group.

Best effort, in Python (audit hooks installed before the program runs, which it cannot remove), everywhere, so
that a program fails the same way on every machine, and the only guard where namespaces are unavailable:
  - writes, deletes, renames, links, chmod/chown/utime outside its folder, and opening a directory outside it
    (whose descriptor would let later calls name paths relative to it), raise PermissionError;
  - sockets other than AF_UNIX, and connect/bind/sendto on any socket;
  - starting other programs (exec, spawn, system, subprocess), loading ctypes, reaching objects through gc,
    signalling processes outside its process group;
  - forks beyond `max_processes` in all (the fork-bomb guard where RLIMIT_NPROC does not bind, i.e. for root).
  A program can get around these (that is what the kernel layer is for); without namespaces a process that
  left its process group also outlives the run, and its folder's total size is not capped.

The program can read whatever the caller's user can read; it has no way to send it anywhere but its output.

This file is also the sandbox's bootstrap script (run as `python -I sandbox.py CONFIG`), so it imports at the
top only what that script needs: its startup is paid per program, and `subprocess` must not be loaded there,
as its fork-and-exec primitive (`_posixsubprocess`) raises no audit event and is refused only on import.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import resource
import select
import signal
import sys
import time
import traceback
import types
from collections.abc import Sequence

STATUSES = ("passed", "failed", "timeout", "memory", "killed", "output_limit")
# Room for the sandbox's own processes (bootstrap, namespace probe, PID-namespace init) and for sandboxes
# starting beside this one, above the program's `max_processes`, in its RLIMIT_NPROC.
_NPROC_SLACK = 8
_TEMP_PREFIX = "jaxreason-sandbox-"


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """How a program's run ended.

    Attributes:
      status: "passed" (exit code 0), "failed" (any other exit code: an exception, a refused operation, a
        syntax error), "timeout" (wall-clock or CPU time), "memory" (MemoryError), "killed" (another signal),
        "output_limit" (stdout, stderr or a file reached `max_file_mb`).
      returncode: the interpreter's exit code; -N when signal N ended it; None when the sandbox killed it at
        the wall-clock timeout.
      stdout, stderr: the last `output_bytes` bytes of each, decoded, after a "[N bytes cut]" line when longer.
      wall_s: seconds from start to the reaping of the sandbox's process.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_in_sandbox(program: str, *, timeout_s: float = 10.0, memory_mb: int = 1024, max_processes: int = 16,
                   max_file_mb: int = 16, disk_mb: int = 64, output_bytes: int = 4096) -> SandboxResult:
    """Runs `program` (Python source, as `__main__`) in a fresh sandboxed interpreter and reports how it ended.

    Args:
      timeout_s: wall-clock limit; each process also gets ceil(timeout_s) seconds of CPU.
      memory_mb: address space per process (RLIMIT_AS); the interpreter itself takes some tens of MB.
      max_processes: processes the program may start, in all.
      max_file_mb: largest file it may write, its captured stdout and stderr included.
      disk_mb: what its folder may hold (enforced only where namespaces work).
      output_bytes: how much of the end of stdout and of stderr the result keeps.
    """
    import shutil
    import tempfile

    if timeout_s <= 0 or min(memory_mb, max_processes, max_file_mb, disk_mb, output_bytes) < 1:
        raise ValueError("sandbox limits must be positive")
    root = os.path.realpath(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    try:
        work, program_path = os.path.join(root, "work"), os.path.join(root, "program.py")
        os.mkdir(work)
        with open(program_path, "wb") as file:
            file.write(program.encode("utf-8", "surrogatepass"))  # a lone surrogate fails to compile, in the child
        uid = os.getuid()
        config = {
            "work": work, "program": program_path, "cpu_s": math.ceil(timeout_s), "memory_bytes": memory_mb << 20,
            "file_bytes": max_file_mb << 20, "disk_mb": disk_mb, "max_processes": max_processes,
            "nproc": None if uid == 0 else _user_tasks(uid) + max_processes + _NPROC_SLACK,
        }
        stdout_path, stderr_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            start = time.perf_counter()
            returncode, timed_out = _spawn_and_wait(config, stdout.fileno(), stderr.fileno(), timeout_s)
            wall_s = time.perf_counter() - start
        output_full = max(os.path.getsize(stdout_path), os.path.getsize(stderr_path)) >= config["file_bytes"]
        stdout_text, stderr_text = _tail(stdout_path, output_bytes), _tail(stderr_path, output_bytes)
        return SandboxResult(_status(returncode, timed_out, output_full, stderr_text),
                             None if timed_out else returncode, stdout_text, stderr_text, wall_s)
    finally:
        _make_removable(root)
        shutil.rmtree(root, ignore_errors=True)


def run_many(programs: Sequence[str], *, workers: int = 4, **limits) -> list[SandboxResult]:
    """`run_in_sandbox(program, **limits)` for each program, `workers` at a time, results in program order.

    Threads suffice: each run waits on its own child process.
    """
    from concurrent.futures import ThreadPoolExecutor

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(functools.partial(run_in_sandbox, **limits), programs))


@functools.cache
def kernel_isolation() -> bool:
    """Whether sandboxed programs here run in their own network, mount and PID namespaces (the kernel
    boundary), rather than only under the rlimits and the best-effort guards."""
    own_namespace = os.readlink("/proc/self/ns/net")
    return run_in_sandbox(f"import os\nassert os.readlink('/proc/self/ns/net') != {own_namespace!r}").passed


# ---------------------------------------------------------------- the caller's side


def _spawn_and_wait(config: dict, stdout_fd: int, stderr_fd: int, timeout_s: float) -> tuple[int, bool]:
    """Starts the bootstrap in a new session and waits for it up to `timeout_s`; then kills its process
    group, and only then reaps it, so that the group's id cannot have been reused. Returns (exit code as
    `subprocess` gives it, whether the timeout struck)."""
    argv = [sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)]
    environment = {"PATH": os.defpath, "HOME": config["work"], "TMPDIR": config["work"], "LANG": "C.UTF-8"}
    pid = os.posix_spawn(sys.executable, argv, environment, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
        (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
    ])
    timed_out = True
    try:
        pidfd = os.pidfd_open(pid)
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            timed_out = not poller.poll(timeout_s * 1000)
        finally:
            os.close(pidfd)
    finally:  # also when interrupted: never leave the sandbox running
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), timed_out


def _status(returncode: int, timed_out: bool, output_full: bool, stderr: str) -> str:
    if output_full:
        return "output_limit"
    if timed_out or returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode == 0:
        return "passed"
    if stderr.rstrip().rpartition("\n")[2].startswith("MemoryError"):
        return "memory"
    return "killed" if returncode < 0 else "failed"


def _tail(path: str, limit: int) -> str:
    """The last `limit` bytes of the file, decoded, after a line saying how many were cut."""
    with open(path, "rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - limit))
        text = file.read().decode("utf-8", "replace")
    return f"[{size - limit} bytes cut]\n{text}" if size > limit else text


def _user_tasks(uid: int) -> int:
    """Tasks (processes and threads: what RLIMIT_NPROC counts) that `uid` runs now."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # it ended meanwhile
                pass
    return count


def _make_removable(root: str) -> None:
    """Gives back write and search permission on the folders a program may have locked (chmod 000)."""
    for folder, subfolders, _ in os.walk(root):
        for name in subfolders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)


# ---------------------------------------------------------------- the sandbox's side (the bootstrap)

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY, _AT_FDCWD, _AT_RECURSIVE = 0x1, -100, 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_AF_UNIX = 1  # socket.AF_UNIX on Linux, without importing socket here

_WRITE_OPEN_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Audit events that change the filesystem -> the (path, dir_fd) argument positions of each path they change
# (Python 3.11's argument order; None: the event has no dir_fd). An int path is an open file descriptor.
_WRITE_EVENTS = {
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.link": ((0, 2), (1, 3)), "os.mkdir": ((0, 2),),
    "os.remove": ((0, 1),), "os.removexattr": ((0, None),), "os.rename": ((0, 2), (1, 3)), "os.rmdir": ((0, 1),),
    "os.setxattr": ((0, None),), "os.symlink": ((1, 2),), "os.truncate": ((0, None),), "os.utime": ((0, 3),),
}
_SPAWN_EVENTS = frozenset({"os.exec", "os.posix_spawn", "os.system", "subprocess.Popen"})
_SOCKET_USE_EVENTS = frozenset({"socket.bind", "socket.connect", "socket.sendmsg", "socket.sendto"})
_FORK_EVENTS = frozenset({"os.fork", "os.forkpty"})
_REFUSED_PREFIXES = ("ctypes.", "gc.get_")
# subprocess's fork-and-exec primitive, which raises no audit event of its own.
_REFUSED_IMPORTS = frozenset({"_posixsubprocess"})


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _bootstrap(config: dict) -> None:
    """The sandbox process: limits, then the program, in namespaces when they can be made, else directly."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # descriptors the caller's libraries left inheritable
    _set_limits(config)
    if not _namespaces_work(config):
        os.chdir(config["work"])
        _run_program(config)
        return
    _enter_namespaces(config)
    os.chdir(config["work"])  # the folder's tmpfs, mounted over the folder after the caller made it
    status_read, status_write = os.pipe()
    init = os.fork()
    if init == 0:  # pid 1 of the new PID namespace: when it dies, the kernel kills every process in it
        os.close(status_read)
        # If the bootstrap dies (the caller kills it at the timeout), so does this init and with it everything
        # else. Had the bootstrap died before this line, the caller's killpg would have caught this process.
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        program = os.fork()
        if program == 0:
            os.close(status_write)
            _run_program(config)
            return
        os.write(status_write, str(_reap_until(program)).encode())
        os._exit(0)
    os.close(status_write)
    _, init_status = os.waitpid(init, 0)
    reported = os.read(status_read, 32)
    _exit_like(int(reported) if reported else init_status)


def _set_limits(config: dict) -> None:
    limits = {
        resource.RLIMIT_CPU: (config["cpu_s"], config["cpu_s"] + 1),  # SIGXCPU, then SIGKILL a second later
        resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (config["file_bytes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if config["nproc"] is not None:
        limits[resource.RLIMIT_NPROC] = (config["nproc"],) * 2
    for limit, (soft, hard) in limits.items():
        _, ceiling = resource.getrlimit(limit)  # where the caller runs under a lower hard limit, that one holds
        if ceiling != resource.RLIM_INFINITY:
            soft, hard = min(soft, ceiling), min(hard, ceiling)
        resource.setrlimit(limit, (soft, hard))


def _namespaces_work(config: dict) -> bool:
    """Whether `_enter_namespaces` succeeds here, tried in a throwaway child: a half-made user namespace
    (e.g. one whose uid map may not be written) cannot be left again."""
    probe = os.fork()
    if probe == 0:
        try:
            _enter_namespaces(config)
        except Exception:
            os._exit(1)
        os._exit(0)
    return os.waitpid(probe, 0)[1] == 0


def _enter_namespaces(config: dict) -> None:
    """New user, mount, network and PID namespaces (the PID one takes effect for the next child); the
    filesystem read-only but for a tmpfs of `disk_mb` over the program's folder."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as file:
            file.write(text)
    _check(libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE), None), "mount --make-rprivate /")
    read_only = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
    _check(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), b"/", ctypes.c_uint(_AT_RECURSIVE),
                        ctypes.byref(read_only), ctypes.c_size_t(ctypes.sizeof(read_only))), "mount_setattr / ro")
    options = f"size={config['disk_mb']}m,mode=0700".encode()
    _check(libc.mount(b"tmpfs", config["work"].encode(), b"tmpfs", ctypes.c_ulong(0), options), "mount tmpfs")


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(v) for v in (value, 0, 0, 0))), f"prctl {option}")


def _reap_until(pid: int) -> int:
    """As the namespace's init: reaps every child (orphans come to it) until `pid` ends; its wait status."""
    while True:
        child, status = os.wait()
        if child == pid:
            return status


def _exit_like(status: int) -> None:
    """Ends this process as the wait `status` says its program ended: same exit code, or same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code  # a signal whose default is to be ignored
    os._exit(code)


def _drop_capabilities() -> None:
    """No capabilities, none to regain through exec (empty bounding set), no setuid gains (no_new_privs).
    Dropping from the bounding set needs CAP_SETPCAP: it fails, harmlessly, where there is nothing to drop."""
    libc = ctypes.CDLL(None, use_errno=True)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    with open("/proc/sys/kernel/cap_last_cap") as file:
        last = int(file.read())
    for capability in range(last + 1):
        libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), *(ctypes.c_ulong(v) for v in (capability, 0, 0, 0)))
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")


def _run_program(config: dict) -> None:
    """Runs the program as `__main__` under the guards; an uncaught exception prints its traceback (without
    this frame) and exits 1, as `python program.py` would."""
    with open(config["program"], "rb") as file:
        source = file.read()
    fork_tokens = _fork_tokens(config["max_processes"])
    _drop_capabilities()
    sys.addaudithook(_guard(os.path.realpath(config["work"]), fork_tokens))
    module = types.ModuleType("__main__")
    module.__file__ = config["program"]
    sys.modules["__main__"], sys.argv = module, [config["program"]]
    try:
        exec(compile(source, config["program"], "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as error:
        traceback.print_exception(error.with_traceback(error.__traceback__.tb_next))
        sys.exit(1)


def _fork_tokens(count: int) -> int:
    """The read end of a pipe holding `count` bytes, one taken per fork by the program's processes, which all
    share it; the write end is closed, so none can be added."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * count)
    os.close(write_end)
    os.set_blocking(read_end, False)
    return read_end


def _guard(work: str, fork_tokens: int):
    """The audit hook that refuses what the module docstring lists, with PermissionError."""
    tokens_file = os.fstat(fork_tokens)
    tokens_id = (tokens_file.st_dev, tokens_file.st_ino)

    def resolve(path, dir_fd) -> str:
        if isinstance(path, int):
            return os.readlink(f"/proc/self/fd/{path}")
        base = os.getcwd() if dir_fd in (None, -1) else os.readlink(f"/proc/self/fd/{dir_fd}")
        return os.path.realpath(os.path.join(base, os.fsdecode(path)))

    def inside(path, dir_fd=None) -> bool:
        try:
            resolved = resolve(path, dir_fd)
        except (OSError, TypeError, ValueError):
            return False
        return resolved == work or resolved.startswith(work + os.sep)

    def take_fork_token() -> bool:
        try:
            stat = os.fstat(fork_tokens)
            return (stat.st_dev, stat.st_ino) == tokens_id and os.read(fork_tokens, 1) == b"x"
        except OSError:  # closed, or the pipe is empty
            return False

    def may_signal(pid: int) -> bool:
        """`os.kill`'s target: process pid (> 0), its own group (0), every process (-1), group -pid (< -1)."""
        if pid in (0, -1):
            return pid == 0
        try:
            return (os.getpgid(pid) if pid > 0 else -pid) == os.getpgid(0)
        except ProcessLookupError:  # no such process: nothing to protect
            return True

    def refused(event: str, args: tuple) -> bool:
        if event == "open":
            path, _, flags = args
            if isinstance(path, int):  # wraps a descriptor it holds: the kernel checks its access mode
                return False
            if flags & _WRITE_OPEN_FLAGS:
                return not inside(path) and path != os.devnull
            return not inside(path) and os.path.isdir(path)
        if event in _WRITE_EVENTS:
            return not all(inside(args[p], None if d is None else args[d]) for p, d in _WRITE_EVENTS[event])
        if event in _FORK_EVENTS:
            return not take_fork_token()
        if event == "socket.__new__":
            return args[1] != _AF_UNIX
        if event == "os.kill":
            return not may_signal(args[0])
        if event == "os.killpg":
            return not may_signal(-args[0])
        if event == "import":
            return args[0] in _REFUSED_IMPORTS
        return event in _SPAWN_EVENTS or event in _SOCKET_USE_EVENTS or event.startswith(_REFUSED_PREFIXES)

    def hook(event: str, args: tuple) -> None:
        if refused(event, args):
            raise PermissionError(f"sandbox: {event} refused")

    return hook


if __name__ == "__main__":
    _bootstrap(json.loads(sys.argv[1]))
