"""`python -m server [overrides]`: start the SuperLink, register merchants, run the federation, stream rounds.

Restarting with the same run directory (`hydra.run.dir=<dir>`) resumes after the last completed round.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

from common.run.env import set_offline

set_offline()


from common.run import procs  # noqa: E402
from common.run.cli import hydra_launcher  # noqa: E402
from common.run.config import FedshopConfig, to_json  # noqa: E402
from common.run.errors import FedshopError  # noqa: E402

log = logging.getLogger("fedshop.server")
APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "fedshop"
SHOWN = ("round ", "fedshop", "resuming", "live page")  # the ServerApp's lines the console shows


def _tls_files(cfg: FedshopConfig) -> dict[str, Path]:
    certs = Path(cfg.deploy.certs).expanduser().resolve()
    files = {"ca": certs / "ca.crt", "cert": certs / "server.crt", "key": certs / "server.key"}
    for path in files.values():
        if not path.is_file():
            raise FedshopError(f"deploy.certs: {path} not found; create certificates with `python -m server.certs "
                               f"--out {certs} --hosts {cfg.deploy.host},localhost --merchants N` "
                               f"(or deploy.insecure=true for a quick look without TLS)")
    return files


def _merchant_keys(cfg: FedshopConfig) -> list[Path]:
    if cfg.deploy.merchant_keys is not None:
        keys = [Path(k).expanduser().resolve() for k in cfg.deploy.merchant_keys]
    else:
        keys = sorted((Path(cfg.deploy.certs).expanduser().resolve() / "merchants").glob("*.pub"))
    for key in keys:
        if not key.is_file():
            raise FedshopError(f"deploy.merchant_keys: {key} not found")
    if not keys:
        raise FedshopError(f"deploy.auth=true but no merchant public keys in {cfg.deploy.certs}/merchants/*.pub "
                           f"(deploy.merchant_keys)")
    return keys


def superlink_command(cfg: FedshopConfig, tls: dict[str, Path] | None) -> list[str]:
    """flower-superlink with every listening address set explicitly."""
    d = cfg.deploy
    cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(d.api_port), "--fleet-api-type", "grpc-rere",
           "--fleet-api-address", f"{d.host}:{d.fleet_port}", "--health-server-address",
           f"127.0.0.1:{d.health_port}", "--disable-runtime-dependency-installation"]
    if tls is None:
        return [*cmd, "--insecure"]
    cmd += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["key"])]
    return [*cmd, "--enable-supernode-auth"] if d.auth else cmd


def write_connection(cfg: FedshopConfig, env: dict[str, str], tls: dict[str, Path] | None) -> None:
    """$FLWR_HOME/config.toml with the connection the flwr CLI uses to reach this SuperLink."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "127.0.0.1:{cfg.deploy.api_port}"']
    lines.append("insecure = true" if tls is None else f'root-certificates = "{tls["ca"]}"')
    (Path(env["FLWR_HOME"]) / "config.toml").write_text("\n".join(lines) + "\n")


def serve(cfg: FedshopConfig, run_dir: Path) -> int:
    """Run the whole server side; returns the exit status."""
    from common.tasks import data as D

    d = cfg.deploy
    if d.insecure:
        log.warning("deploy.insecure=true: no TLS and no merchant authentication; anyone reaching %s:%d can join "
                    "and read the model", d.host, d.fleet_port)
        tls = None
    else:
        tls = _tls_files(cfg)
    keys = _merchant_keys(cfg) if tls is not None and d.auth else []
    test, labels = D.load_test(cfg)
    log.info("server: %d test examples, labels %s; Fleet API (gRPC) on %s:%d%s", len(test), labels, d.host,
             d.fleet_port, "" if tls is None else ", TLS" + (" + merchant authentication" if d.auth else ""))
    env = procs.flower_env(run_dir)
    env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(max(0.01, d.poll_interval / 2))
    write_connection(cfg, env, tls)
    superlink = procs.start(superlink_command(cfg, tls), run_dir / "superlink.log", env)
    (run_dir / "superlink.pid").write_text(f"{superlink.pid}\n")
    try:
        if not procs.wait_port("127.0.0.1", d.api_port, 60, superlink) or \
                not procs.wait_port("127.0.0.1" if d.host == "0.0.0.0" else d.host, d.fleet_port, 30, superlink):
            raise FedshopError(f"the SuperLink did not start (ports {d.api_port}/{d.fleet_port} in use?): "
                               f"{procs.tail(run_dir / 'superlink.log', 5)}")
        for key in keys:
            out = subprocess.run(["flwr", "supernode", "register", str(key), CONNECTION], env=env, text=True,
                                 capture_output=True, check=False)
            if out.returncode != 0:
                raise FedshopError(f"could not register merchant key {key}: {(out.stdout + out.stderr).strip()}")
            log.info("registered merchant key %s", key.name)
        log.info("server ready: merchants can connect to %s:%d", d.host, d.fleet_port)
        run_toml = run_dir / "run_config.toml"
        run_toml.write_text(f"config-json = '''{to_json(cfg)}'''\nrun-dir = \"{run_dir}\"\n")
        flwr = subprocess.Popen(["flwr", "run", str(APP_DIR), CONNECTION, "--run-config", str(run_toml), "--stream"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert flwr.stdout is not None
        with (run_dir / "serverapp.log").open("a") as applog:
            for line in flwr.stdout:
                applog.write(line)
                applog.flush()
                text = line.rstrip()
                if text.startswith(SHOWN) or "ERROR" in text or "rror:" in text:
                    print(text, flush=True)
        flwr.wait()
    finally:
        procs.stop(superlink)
    results = run_dir / "results.json"
    doc = json.loads(results.read_text()) if results.is_file() else {}
    if doc.get("status") != "completed":
        why = f": {doc['error']}" if doc.get("error") else ""
        raise FedshopError(f"the federated run did not complete (status {doc.get('status')}){why}; see "
                           f"{run_dir}/serverapp.log")
    log.info("run directory: %s", run_dir)
    return 0


if __name__ == "__main__":
    hydra_launcher(serve, log)()
