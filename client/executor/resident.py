"""A resident ClientApp worker: one process serves a merchant's consecutive tasks of the same FAB.

Flower's `run_clientapp` (flwr 1.39, flwr/supernode/runtime/run_clientapp.py) serves one task, then exits the
process, so every task of a deployed merchant installs the FAB again (0.2-0.35 s), imports the app (0.15 s) and
builds the merchant's model skeleton and tokenised shard (0.6 s for the tiny model, seconds for MiniLM).
`run_one` makes the same Runtime API calls in the same order (pull the task input, install the FAB, load the app,
call it, push the reply, push the task's output, a heartbeat throughout) without exiting, so the app's caches
(client/client_app.py: the model skeleton, the tokenised shards, the parsed run config) live on between rounds,
as they do in a simulation's Ray actor. What a merchant must remember between rounds still travels in
Context.state. A worker serves one FAB hash only; the executor starts another for another FAB.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from flwr.app import Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime import run_clientapp as flower_task

from client.executor.task import OWN_PACKAGES

log = logging.getLogger("fedshop.executor")


def serve(conn: Connection, fab_hash: str, parent_pid: int) -> None:
    """Run the tasks the executor sends over `conn` (run_clientapp's keyword arguments) until it sends None."""
    from client import flower_patches

    start_parent_process_monitor(parent_pid)  # the executor's pid: a worker never outlives its executor
    flower_patches.apply_task()
    sys.dont_write_bytecode = False  # as in client/executor/task.py: the FAB's bytecode is compiled once
    for name in [m for m in sys.modules if m.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[name]
    while (job := conn.recv()) is not None:
        conn.send(run_one(fab_hash, **job))


def run_one(fab_hash: str, runtime_api_address: str, token: str, insecure: bool,
            certificates: bytes | None) -> bool:
    """One ClientApp task through the Runtime API, as Flower's run_clientapp; True when the app completed."""
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = reply = context = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, fab = flower_task.pull_task_input(client)
        if hashlib.sha256(fab.content).hexdigest() != fab_hash:
            raise RuntimeError(f"this worker serves FAB {fab_hash[:12]}, the task sent {fab.hash_str[:12]}")
        if not Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str)).is_dir():
            install_from_fab(fab.content, skip_prompt=True)
        app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            run.fab_id, run.fab_version, fab.hash_str)
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # noqa: BLE001 (run_clientapp's contract: the error goes back as the reply)
        log.error("ClientApp raised an exception", exc_info=err)
        details = f"{type(err)}:<'{err}'>"
        if message is not None:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        _finish(client, heartbeat, reply, context, status, details)
    return status == SubStatus.COMPLETED


def _finish(client: Any, heartbeat: HeartbeatSender, reply: Message | None, context: Any, status: str,
            details: str) -> None:
    """Push the reply and the task's output, as run_clientapp does on its way out."""
    try:
        if reply is not None and context is not None:
            flower_task.push_message(client, reply, context)
    except Exception as err:  # noqa: BLE001
        log.error("Failed to push reply message", exc_info=err)
    finally:
        flower_task.push_task_output(client=client, context=context, sub_status=status, details=details)
        heartbeat.stop()
        client.close()
