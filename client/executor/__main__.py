"""`python -m client.executor --runtime-api-address HOST:PORT [...]`: a merchant's task executor.

Flower 1.39's SuperNode runs every message (train, evaluate, ...) in a new `flwr-clientapp` process that
imports torch, transformers and datasets from scratch: about 6.6 s of CPU before the first line of
fedshop runs, twice per merchant per round. With `flower-supernode --isolation process` the node leaves
starting those processes to an external SuperExec; this is that SuperExec. It is Flower's own
`run_superexec` loop (task acquisition, SuperExec authentication, health) with one change (patch 5 in
client/flower_patches.py): each ClientApp task runs Flower's unchanged `run_clientapp` in a process forked
from a multiprocessing fork server that imported the heavy libraries once.

With `--resident` (deploy.executor=resident, the default) the tasks of one FAB go to one resident worker forked
from that server (client/executor/resident.py): it keeps the app and its caches (model skeleton, tokenised shard)
between rounds, as a simulation's Ray actor does, and a round no longer pays for them again. What a merchant
must remember between rounds still travels in Context.state. Without it (deploy.executor=forkserver) every task
gets a fresh process. Either way the task drops fedshop's own modules before loading the app, so the code that
runs is the FAB the server sent, exactly as with Flower's executor (see client/executor/task.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from pathlib import Path

from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec import run_superexec as flower_superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.executor.types import ExecutionSpec

from client import flower_patches
from client.executor.resident import serve
from client.executor.task import run_task

log = logging.getLogger("fedshop.executor")

# Third-party modules a fedshop ClientApp imports, then the executor's own task runner and warm-up; the app's
# packages are deliberately absent (they come from the FAB). A module that is not installed is skipped.
PRELOAD = ["numpy", "torch", "torch.utils.data", "tokenizers", "transformers", "transformers.models.auto",
           "transformers.models.bert.modeling_bert", "transformers.models.bert.tokenization_bert",
           "datasets", "omegaconf", "hydra", "peft", "peft.tuners.lora", "peft.mapping_func", "flwr_datasets",
           "flwr_datasets.partitioner", "tqdm", "flwr.app",
           "flwr.clientapp", "flwr.supernode.runtime.run_clientapp", "client.executor.task",
           "client.executor.resident", "client.executor.warm"]


@dataclass
class Worker:
    """A resident worker process (client/executor/resident.py) and the task it is running, if any."""

    proc: multiprocessing.process.BaseProcess
    conn: Connection
    fab_hash: str
    task_id: int | None = None
    started: float = 0.0


class ForkServerExecutor:
    """Flower Executor protocol: ClientApp tasks run in processes forked from a warm fork server.

    With `resident`, a task goes to an idle resident worker for its FAB (one is forked the first time), which
    keeps the app and its caches between tasks; a task arriving while that worker is busy gets a fresh process.
    """

    def __init__(self, preload: list[str], resident: bool = False) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([m for m in preload if _installed(m)])
        forkserver.ensure_running()
        self.resident = resident
        self.running: list[tuple[multiprocessing.process.BaseProcess, float]] = []
        self.workers: list[Worker] = []

    def get_eligible_capacity(self, supported_task_types: set[TaskType], *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set[TaskType], set[str]]:
        """A merchant executes ClientApp tasks only."""
        return supported_task_types & {TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type: TaskType | None = None, *, fab_hash: str | None = None,
                          insecure: bool = False, root_certificates_path: str | None = None) -> None:
        """No capacity gate: every acquired task starts at once."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Hand the task to an idle resident worker, or fork a process that runs Flower's run_clientapp."""
        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"fedshop's merchant executor runs ClientApp tasks only, not {spec.task_type}")
        certificates = Path(spec.root_certificates_path).read_bytes() if spec.root_certificates_path else None
        job = {"runtime_api_address": spec.runtime_api_address, "token": spec.token, "insecure": spec.insecure,
               "certificates": certificates}
        try:
            worker = self._idle_worker(spec.fab_hash) if self.resident and spec.fab_hash else None
            if worker is not None:
                worker.conn.send(job)
                worker.task_id, worker.started = spec.task_id, time.perf_counter()
                log.info("task %d: to resident worker pid %s", spec.task_id, worker.proc.pid)
                return LaunchResult.accepted()
            proc = self.ctx.Process(target=run_task, name=f"clientapp-task-{spec.task_id}", kwargs={
                **job, "parent_pid": os.getpid(), "runtime_dependency_install": False})
            proc.start()
        except OSError as err:
            return LaunchResult.failed(f"could not start a ClientApp process: {err}")
        self.running.append((proc, time.perf_counter()))
        log.info("task %d: started %s (pid %s)", spec.task_id, proc.name, proc.pid)
        return LaunchResult.accepted()

    def _idle_worker(self, fab_hash: str) -> Worker | None:
        """The idle resident worker for this FAB, forked if there is none (workers of other FABs retire);
        None while it is busy."""
        for w in [w for w in self.workers if w.fab_hash != fab_hash]:
            self._retire(w)
        if not self.workers:
            ours, theirs = self.ctx.Pipe()
            proc = self.ctx.Process(target=serve, args=(theirs, fab_hash, os.getpid()), name="clientapp-resident")
            proc.start()
            theirs.close()
            self.workers.append(Worker(proc, ours, fab_hash))
            log.info("resident worker started: pid %s for FAB %s", proc.pid, fab_hash[:12])
        worker = self.workers[0]
        return worker if worker.task_id is None else None

    def _retire(self, worker: Worker) -> None:
        """Ask a worker to exit after its task (it is reaped in reconcile)."""
        try:
            worker.conn.send(None)
        except OSError:
            pass
        self.workers.remove(worker)
        self.running.append((worker.proc, time.perf_counter()))

    def reconcile(self) -> None:
        """Reap finished task processes and collect resident workers' results; a failed task is logged (Flower
        reports the task's status itself). A worker that died is replaced by the next task."""
        for w in list(self.workers):
            if w.task_id is not None and (ok := _result(w.conn)) is not None:
                log.log(logging.INFO if ok else logging.WARNING, "task %d: %s after %.2f s (resident pid %s)",
                        w.task_id, "completed" if ok else "failed", time.perf_counter() - w.started, w.proc.pid)
                w.task_id = None
            elif not w.proc.is_alive():
                log.warning("resident worker pid %s exited with status %s%s", w.proc.pid, w.proc.exitcode,
                            f" during task {w.task_id}" if w.task_id is not None else "")
                self.workers.remove(w)
        still = []
        for proc, started in self.running:
            if proc.is_alive():
                still.append((proc, started))
                continue
            proc.join()
            level = logging.WARNING if proc.exitcode else logging.INFO
            log.log(level, "%s: exited with status %s after %.2f s", proc.name, proc.exitcode,
                    time.perf_counter() - started)
        self.running = still

    def close(self) -> None:
        """Stop task processes and resident workers (the SuperExec is shutting down)."""
        for w in list(self.workers):
            self._retire(w)
        for proc, _ in self.running:
            proc.terminate()
        for proc, _ in self.running:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.running = []


def _result(conn: Connection) -> bool | None:
    """A resident worker's answer for its task, if it has sent one (None too when the worker has gone: a pipe
    whose other end closed polls readable and raises on recv)."""
    try:
        return bool(conn.recv()) if conn.poll() else None
    except (EOFError, OSError):
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def main(argv: list[str] | None = None) -> None:
    """Parse flower-superexec's connection flags, then run Flower's SuperExec loop with the fork server."""
    ap = argparse.ArgumentParser(prog="python -m client.executor", description=__doc__.splitlines()[0])
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (loopback only)")
    ap.add_argument("--root-certificates", default=None, help="CA certificate of the Runtime API")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    ap.add_argument("--superexec-auth-secret-file", default=None, help="shared secret the SuperNode also has")
    ap.add_argument("--resident", action="store_true", help="a resident worker serves consecutive tasks")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        flower_patches.use_executor(ForkServerExecutor(PRELOAD, a.resident))
    except RuntimeError as err:
        sys.exit(str(err))
    secret = load_superexec_auth_secret(a.superexec_auth_secret_file)
    log.info("fork server ready (pid %d); acquiring ClientApp tasks from %s", os.getpid(), a.runtime_api_address)
    flower_superexec.run_superexec(runtime_api_address=a.runtime_api_address, insecure=a.insecure,
                                   root_certificates_path=a.root_certificates, superexec_auth_secret=secret,
                                   parent_pid=a.parent_pid, runtime_dependency_install=False)


if __name__ == "__main__":
    main()
