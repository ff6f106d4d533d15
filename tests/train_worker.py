"""One process of the two-process training tests (tests/algorithms/test_*_processes.py); not collected.

`python tests/train_worker.py PROCESS_ID PORT ARGS... [--then ARGS...]...` joins a 2-process job on 127.0.0.1:PORT
(run it with JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=4) and runs `jaxreason ARGS`
in it, then each command after a `--then` in turn (several runs in one job, which starts once).
"""

from __future__ import annotations

import sys

THEN = "--then"


def main() -> None:
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    from jaxreason import distributed

    distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from jaxreason.cli import main as cli

    command: list[str] = []
    for arg in [*sys.argv[3:], THEN]:
        if arg == THEN:
            cli(command)
            command = []
        else:
            command.append(arg)


if __name__ == "__main__":
    from two_processes import run_worker

    run_worker(main)
