"""Run a function on W local processes joined in a process group, with a deadline: how the tests start ranks.

:func:`run_on_local_ranks` starts one fresh Python process per rank (no fork: torch's thread pools
do not survive one), each joining a gloo group on 127.0.0.1 at a free port and calling
``function(rank, world_size, *args)``; it returns every rank's (JSON) result in rank order. It
never blocks past ``timeout``: when a rank fails, the others get ``grace`` seconds to fail on their
own (a ring peer sees the closed connection at once) and are then killed, and the error lists
every rank, the first to fail first. Run as ``python -m pyattn.distributed.testing SPEC`` it is
the worker.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

__all__ = ["run_on_local_ranks", "RanksFailed", "free_port"]


class RanksFailed(RuntimeError):
    """One or more ranks failed, hung past the deadline, or were stopped after a peer failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_on_local_ranks(target: str, world_size: int, *, args: tuple = (), timeout: float = 120.0,
                       grace: float = 10.0, backend: str = "gloo", pythonpath: tuple[str, ...] = (),
                       threads: int = 1) -> list:
    """Call ``target`` ("package.module:function") as ``function(rank, world_size, *args)`` on each of
    ``world_size`` local ranks after ``init_process_group(backend)``; return the results in rank order.

    ``args`` and the results travel as JSON. ``pythonpath``: directories the workers import from
    (e.g. the repository root for ``tests.*``). ``threads``: torch's intra-op threads per rank.
    Raises :class:`RanksFailed` if any rank raises, exits, or is still running at ``timeout`` seconds.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"run_on_local_ranks: world_size must be an int >= 1, got {world_size!r}")
    port = free_port()
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    environment.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: not whatever interface the hostname names
    environment["PYTHONPATH"] = os.pathsep.join([*pythonpath, *filter(None, [environment.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory(prefix="pyattn-ranks-") as directory:
        folder = Path(directory)
        processes, logs = [], []
        for rank in range(world_size):
            spec = dict(target=target, rank=rank, world_size=world_size, port=port, backend=backend, args=list(args),
                        result=str(folder / f"rank{rank}.json"), threads=threads,
                        collective_timeout=max(5.0, timeout - 5.0))
            spec_path = folder / f"rank{rank}.spec.json"
            spec_path.write_text(json.dumps(spec))
            log = open(folder / f"rank{rank}.log", "w")
            logs.append(log)
            processes.append(subprocess.Popen([sys.executable, "-m", "pyattn.distributed.testing", str(spec_path)],
                                              stdout=log, stderr=subprocess.STDOUT, env=environment))
        start = time.monotonic()
        ended: dict[int, float] = {}
        stopped: dict[int, str] = {}
        first_failure = None
        while len(ended) + len(stopped) < world_size:
            now = time.monotonic()
            for rank, process in enumerate(processes):
                if rank not in ended and rank not in stopped and process.poll() is not None:
                    ended[rank] = now - start
                    if process.returncode != 0 and first_failure is None:
                        first_failure = (rank, now)
            running = [r for r in range(world_size) if r not in ended and r not in stopped]
            if running and now - start > timeout:
                reason = f"still running at the {timeout:.0f} s deadline (a hang?): killed"
            elif running and first_failure is not None and now - first_failure[1] > grace:
                reason = f"still running {grace:.0f} s after rank {first_failure[0]} failed: killed"
            else:
                if running:
                    time.sleep(0.05)
                continue
            for rank in running:
                processes[rank].kill()
                processes[rank].wait()
                stopped[rank] = reason
        for log in logs:
            log.close()
        results, failures = [None] * world_size, []
        for rank in range(world_size):
            output = (folder / f"rank{rank}.log").read_text(errors="replace")
            record_path = folder / f"rank{rank}.json"
            record = json.loads(record_path.read_text()) if record_path.exists() else {}
            if rank in stopped:
                failures.append((float("inf"), rank, f"rank {rank}: {stopped[rank]}\n{_tail(output, 10)}"))
            elif processes[rank].returncode != 0 or "result" not in record:
                error = record.get("error") or _tail(output)
                failures.append((ended[rank], rank, f"rank {rank}: exited with {processes[rank].returncode} after "
                                                    f"{ended[rank]:.1f} s:\n{_tail(error)}"))
            else:
                results[rank] = record["result"]
    if failures:
        failures.sort()
        raise RanksFailed(f"{len(failures)} of {world_size} ranks of {target} failed (first failure first):\n\n"
                          + "\n\n".join(text for _, _, text in failures))
    return results


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result"])
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(spec["threads"])
        dist.init_process_group(spec["backend"], init_method=f"tcp://127.0.0.1:{spec['port']}", rank=spec["rank"],
                                world_size=spec["world_size"],
                                timeout=datetime.timedelta(seconds=spec["collective_timeout"]))
        module_name, function_name = spec["target"].split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        result = function(spec["rank"], spec["world_size"], *spec["args"])
        result_path.write_text(json.dumps({"result": result}))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (reported to the launcher, then out at once: peers see the closed pipe)
        result_path.write_text(json.dumps({"error": traceback.format_exc()}))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


if __name__ == "__main__":
    _worker(sys.argv[1])
