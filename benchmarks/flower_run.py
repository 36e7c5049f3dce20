"""Fed MobiLLM on Flower with real packaged backbones (issue 12): what ran and what it measured.

Needs the extra (``pip install -e '.[flower]'``, README "Fed MobiLLM on Flower"). Two modes, each starting and
stopping every Flower process it uses by PID (:class:`~lightning_mobillm.flower.launch.FlowerProcesses`):

* ``--mode simulation``: a SuperLink in simulation mode and ``flwr run apps/flower own --federation-config
  "num_supernodes=N ..."`` (Ray backend), as ``flwr run apps/flower local`` does with Flower's managed SuperLink;
* ``--mode deployment``: the README's commands for real devices, on this machine: a self-signed certificate
  (``openssl``), one P-384 key per SuperNode (``ssh-keygen``), ``flower-superlink`` with TLS and
  ``--enable-supernode-auth``, ``flwr supernode register`` of each public key, N ``flower-supernode`` processes
  dialling it with TLS and their private keys (``partition-id=i num-partitions=N``), then ``flwr run``.

The JSON (``--out``): the mode, nodes, backbones, the ServerApp's ``summary.json`` (accuracy per node and type,
samples, steps, arrival times, refusals), ``wall_s`` of ``flwr run``, ``peak_rss_mb`` (the summed RSS of every
Flower process of the run, sampled every 0.5 s: SuperLink, SuperExec, ServerApp, ClientApps, SuperNodes, Ray),
``messages`` (pushed by the ServerApp: one upload and one evaluation per node) and the machine. Time here is wall
time on one 2-core machine shared by every process: it is not the virtual clock of ``benchmarks/federated.py``.

    python benchmarks/flower_run.py --mode simulation --nodes 4 --out benchmarks/results/flower_simulation.json
    python benchmarks/flower_run.py --mode deployment --nodes 2 --out benchmarks/results/flower_deployment.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tls(workdir: Path) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1 (the README's openssl command with an IP address)."""
    key, cert = workdir / "server.key", workdir / "server.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes",
                    "-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return {"ca": cert, "cert": cert, "key": key}


def _node_key(workdir: Path, name: str) -> tuple[Path, Path]:
    """A P-384 key pair in OpenSSH format (what ``flwr supernode register`` and ``flower-supernode`` read)."""
    key = workdir / name
    subprocess.run(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-N", "", "-q", "-f", str(key)], check=True,
                   capture_output=True, timeout=60)
    return key, key.with_suffix(".pub")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("simulation", "deployment"), default="simulation")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--method", choices=("fed_mobillm", "fedavg_lora"), default="fed_mobillm")
    parser.add_argument("--backbones", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--run-config", default="", help="more overrides, 'key=value' separated by spaces (TOML)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--workdir", default=None, help="logs and the server's folder (default: a temporary one)")
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    args = parser.parse_args(argv)

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    import flwr
    import psutil

    from lightning_mobillm.flower.launch import FlowerProcesses

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="flower-run-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    summary_path = workdir / "summary.json"
    overrides = {"method": args.method, "backbones": args.backbones, "run-id": f"flower-{args.mode}",
                 "server.workdir": str(workdir / "server"), "flower.summary": str(summary_path),
                 "flower.min_nodes": args.nodes, "flower.wait_for_nodes_s": 600.0}
    for key, value in re.findall(r'(\S+?)=("(?:[^"\\]|\\.)*"|\S+)', args.run_config):  # key=TOML value
        overrides[key] = tomllib.loads(f"v = {value}")["v"]
    flower = FlowerProcesses(workdir / "flower", env={"PYTHONPATH": str(REPO)})
    record: dict = {"mode": args.mode, "nodes": args.nodes, "method": args.method,
                    "backbones": args.backbones.split(","), "run_config": overrides,
                    "command": "python benchmarks/flower_run.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    t0 = time.monotonic()
    try:
        if args.mode == "simulation":
            flower.start_superlink(simulation=True)
            fed = (f"num_supernodes={args.nodes} client_resources_num_cpus=1 "
                   f"init_args_num_cpus={os.cpu_count() or 2}")
            start = time.monotonic()
            run = flower.run_app(overrides, fed, timeout_s=args.timeout_s)
        else:
            tls = _tls(flower.workdir)
            flower.start_superlink(simulation=False, tls=tls, node_auth=True)
            for i in range(args.nodes):
                key, pub = _node_key(flower.workdir, f"phone-{i}")
                reg = flower.flwr("supernode", "register", str(pub), "own")
                if reg.returncode != 0:
                    raise RuntimeError(f"flwr supernode register failed: {reg.stdout}{reg.stderr}")
                flower.start_supernode(f"supernode-{i}", f"partition-id={i} num-partitions={args.nodes}",
                                       tls_ca=tls["ca"], auth_key=key)
            start = time.monotonic()
            run = flower.run_app(overrides, None, timeout_s=args.timeout_s)
        record["wall_s"] = time.monotonic() - start
        record["returncode"] = run.returncode
        record["flwr_output_tail"] = (run.stdout + run.stderr)[-3000:]
    finally:
        record["processes_owned"] = len(flower.owned)
        record["processes_left"] = flower.stop()
    record["peak_rss_mb"] = flower.peak_rss_mb
    record["total_s"] = time.monotonic() - t0
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    record["summary"] = summary
    if summary is not None and args.method == "fed_mobillm":
        record["messages"] = {"pushed": 2 * summary["nodes"], "uploads_accepted": summary["nodes_uploaded"],
                              "evaluations": summary["nodes_evaluated"]}
        record["val_acc"] = summary["val_acc"]
    elif summary is not None:
        record["val_acc"] = summary["val_acc"]
        record["messages"] = {"rounds": summary["rounds"]}
    record["machine"] = {"cpu_count": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30,
                         "platform": platform.platform(), "python": platform.python_version(),
                         "flwr": flwr.__version__}
    text = json.dumps(record, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(json.dumps({k: record.get(k) for k in ("mode", "nodes", "wall_s", "peak_rss_mb", "val_acc", "messages",
                                                 "processes_left", "returncode")}, default=str))
    if record.get("returncode") != 0 or summary is None:
        sys.exit(1)


if __name__ == "__main__":
    main()
