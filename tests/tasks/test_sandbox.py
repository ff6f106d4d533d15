"""The sandbox: each hostile program is contained and reported as a failed attempt, never an exception, and the
caller, its files and the machine are as they were afterwards."""

import os
import resource
import socket
import tempfile
import textwrap
import time

import pytest

from jaxreason.tasks.sandbox import STATUSES, SandboxResult, kernel_isolation, run_in_sandbox, run_many

LIMITS = {"timeout_s": 2.0, "memory_mb": 512, "max_file_mb": 4}


def run(program: str, **limits) -> SandboxResult:
    result = run_in_sandbox(textwrap.dedent(program), **{**LIMITS, **limits})
    assert result.status in STATUSES
    return result


def sandbox_processes() -> list[int]:
    """Processes of any sandbox still alive: their command line names the sandbox's temporary folder (a zombie,
    dead and waiting for init to reap it, has none)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as file:
                    if b"jaxreason-sandbox-" in file.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def assert_no_sandbox_processes(grace_s: float = 2.0):
    deadline = time.monotonic() + grace_s  # processes killed without a PID namespace are reaped by init
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


def sandbox_folders() -> set[str]:
    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith("jaxreason-sandbox-")}


def test_passing_program_and_its_output():
    result = run("print('hello'); import sys; print('oops', file=sys.stderr)")
    assert result.passed and result.status == "passed" and result.returncode == 0
    assert result.stdout == "hello\n" and result.stderr == "oops\n"
    assert 0 < result.wall_s < LIMITS["timeout_s"]


def test_failing_assertion_is_a_failed_attempt():
    result = run("assert 1 + 1 == 3, 'wrong sum'")
    assert not result.passed and result.status == "failed" and result.returncode == 1
    assert result.stderr.rstrip().endswith("AssertionError: wrong sum")
    assert "sandbox.py" not in result.stderr  # the traceback starts in the program


@pytest.mark.parametrize("program, returncode", [("import os; os._exit(3)", 3), ("raise SystemExit(7)", 7),
                                                 ("def broken(:", 1)])
def test_exit_codes_and_syntax_errors(program, returncode):
    result = run(program)
    assert result.status == "failed" and result.returncode == returncode


def test_infinite_loop_times_out():
    result = run("while True: pass")
    assert result.status == "timeout" and result.returncode is None
    assert LIMITS["timeout_s"] <= result.wall_s < LIMITS["timeout_s"] + 1


def test_fifty_gigabyte_allocation_is_a_memory_failure():
    result = run("block = bytearray(50 * 2**30)")
    assert result.status == "memory" and result.stderr.rstrip().endswith("MemoryError")


def test_fork_bomb_is_contained_and_leaves_no_process():
    folders = sandbox_folders()
    result = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, max_processes=8)
    assert result.status == "timeout" and not result.passed
    assert_no_sandbox_processes()
    assert sandbox_folders() == folders
    assert run("print('still fine')").stdout == "still fine\n"


def test_children_left_behind_are_killed():
    result = run("""
        import os, time
        if os.fork() == 0:
            time.sleep(60)
        print('parent done')
    """)
    assert result.passed and result.stdout == "parent done\n"
    assert_no_sandbox_processes()


@pytest.mark.skipif(not kernel_isolation(), reason="needs namespaces: without them a new session escapes the kill")
def test_children_in_their_own_session_are_killed_too():
    result = run("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
    """)
    assert result.passed
    assert_no_sandbox_processes(grace_s=0.0)


@pytest.mark.parametrize("address", ["127.0.0.1", "8.8.8.8"])
def test_network_connection_is_refused(address):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1] if address == "127.0.0.1" else 53
        result = run(f"""
            import socket
            socket.create_connection(({address!r}, {port}), timeout=1).sendall(b'leak')
            print('connected')
        """)
        assert result.status == "failed" and "connected" not in result.stdout
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()


def test_writes_outside_its_folder_do_not_land(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    for program in [
        f"open({str(victim)!r}, 'w').write('overwritten')",
        f"open({str(victim)!r}, 'a').write('appended')",
        f"open({str(tmp_path / 'new.txt')!r}, 'x').write('created')",
        f"import os; os.symlink({str(victim)!r}, 'link'); open('link', 'w').write('through a link')",
        f"import os; os.chmod({str(victim)!r}, 0o777)",
        f"import os; fd = os.open({str(tmp_path)!r}, os.O_RDONLY); os.open('new.txt', os.O_CREAT | os.O_WRONLY,"
        " dir_fd=fd)",
    ]:
        result = run(program)
        assert result.status == "failed" and "PermissionError" in result.stderr, program
    assert victim.read_text() == "original" and victim.stat().st_mode & 0o777 != 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_deleting_files_outside_its_folder_does_not_land(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    for program in [f"import os; os.remove({str(victim)!r})", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                    f"import os; os.rename({str(victim)!r}, 'stolen.txt')",
                    f"import subprocess; subprocess.run(['rm', '-rf', {str(tmp_path)!r}])"]:
        assert run(program).status == "failed", program
    assert victim.read_text() == "original"


def test_its_folder_is_writable_private_and_removed():
    folders = sandbox_folders()
    result = run("""
        import os, tempfile
        assert os.environ['HOME'] == os.getcwd() == os.path.realpath(tempfile.gettempdir())
        with open('notes.txt', 'w') as file:
            file.write('scratch')
        os.makedirs('locked/inner')
        os.chmod('locked', 0)
        print(open('notes.txt').read())
    """)
    assert result.passed and result.stdout == "scratch\n"
    assert sandbox_folders() == folders


def test_a_gigabyte_of_output_stops_at_the_cap_quickly():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run("""
        import sys
        chunk = 'x' * (1 << 20)
        for _ in range(1024):
            sys.stdout.write(chunk)
    """, output_bytes=1000)
    assert result.status == "output_limit" and result.wall_s < LIMITS["timeout_s"]
    assert result.stdout.startswith(f"[{4 * 2**20 - 1000} bytes cut]\n") and len(result.stdout) < 1100
    assert "File too large" in result.stderr
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 64 * 1024  # KiB


def test_output_written_past_the_cap_until_the_timeout_is_an_output_limit():
    result = run("""
        import sys
        while True:
            try:
                sys.stdout.write('x' * 65536)
            except OSError:
                pass
    """)
    assert result.status == "output_limit" and len(result.stdout) < 5000


@pytest.mark.skipif(not kernel_isolation(), reason="namespaces are not available here")
def test_kernel_boundary_where_namespaces_work():
    result = run("""
        print(open('/proc/self/net/dev').read().split('\\n')[2:])
        root = next(line.split() for line in open('/proc/self/mountinfo') if line.split()[4] == '/')
        print('ro' in root[5].split(','))
        try:
            with open('filler', 'wb') as file:
                for _ in range(64):
                    file.write(b'x' * 2**20)
        except OSError as error:
            print(error.strerror)
    """, max_file_mb=64, disk_mb=8)
    interfaces, read_only_root, disk_full = result.stdout.splitlines()
    assert result.passed and "lo:" in interfaces and interfaces.count(":") == 1  # loopback alone
    assert read_only_root == "True" and disk_full == "No space left on device"


def test_run_many_keeps_program_order():
    results = run_many([f"print({i})" for i in range(5)] + ["raise ValueError"], workers=2, **LIMITS)
    assert [r.stdout for r in results[:5]] == [f"{i}\n" for i in range(5)]
    assert [r.status for r in results] == ["passed"] * 5 + ["failed"]


def test_bad_limits_are_the_callers_error():
    with pytest.raises(ValueError, match="positive"):
        run_in_sandbox("pass", timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        run_many(["pass"], workers=0)
