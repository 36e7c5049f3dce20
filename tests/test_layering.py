"""The layering of the package, checked on the import graph (grimp, import-linter's engine) and by
exercising the device path in a fresh process: see ``docs/architecture.md`` for who imports whom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import grimp
import pytest

PKG = "lightning_mobillm"
#: the device side: what a device process imports to train (``cli`` is also the server's entry: its
#: ``serve`` subcommand imports the server runtime inside that function, in a server process only)
DEVICE = [f"{PKG}.strategies", f"{PKG}.callbacks", f"{PKG}.baselines", f"{PKG}.client", f"{PKG}.modules",
          f"{PKG}.data", f"{PKG}.backbone", f"{PKG}.protocol", f"{PKG}.transport"]
#: the server runtime: sessions, stores, engines, server roles
SERVER = f"{PKG}.server"


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(PKG, cache_dir=None)


def _modules(graph: grimp.ImportGraph, package: str) -> set[str]:
    """A module, or a package with everything under it."""
    return {package} | set(graph.find_descendants(package))


def test_no_import_circle(graph):
    circles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                circles.append(" -> ".join((module, *chain)))
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("importer", DEVICE)
def test_device_side_never_imports_the_server_runtime(graph, importer):
    for module in sorted(_modules(graph, importer)):
        chain = graph.find_shortest_chains(importer=module, imported=SERVER, as_packages=True)
        assert not chain, f"{module} reaches the server runtime: {sorted(chain)}"


def test_no_server_module_imports_baselines(graph):
    chains = graph.find_shortest_chains(importer=SERVER, imported=f"{PKG}.baselines", as_packages=True)
    assert not chains, f"server modules import baselines: {sorted(chains)}"


@pytest.mark.parametrize("layer", [f"{PKG}.protocol", f"{PKG}.transport"])
def test_contract_and_transport_know_nothing_of_lightning_or_methods(graph, layer):
    for other in ("lightning", f"{PKG}.modules", f"{PKG}.strategies", f"{PKG}.server", f"{PKG}.baselines"):
        if other == "lightning":
            imported = set().union(*(graph.find_modules_directly_imported_by(m) for m in _modules(graph, layer)))
            assert not {m for m in imported if m == "lightning" or m.startswith("lightning.")}
        else:
            assert not graph.find_shortest_chains(importer=layer, imported=other, as_packages=True), (layer, other)


DEVICE_RUN = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    from lightning_mobillm.baselines import SplitLearningClassifier  # noqa: F401 - the device half of split
    from lightning_mobillm.callbacks import ActivationCache, DeviceMonitor, QuantizedTransfer  # noqa: F401
    from lightning_mobillm.data import TextClassificationDataModule
    from lightning_mobillm.modules import SideTuningModule
    from lightning_mobillm.server_config import ServerConfig
    from lightning_mobillm.specs import BackboneConfig
    from lightning_mobillm.strategies import ServerAssistedStrategy

    model_dir, data_file = sys.argv[1], sys.argv[2]
    data = TextClassificationDataModule(dataset="json", data_files=data_file, max_length=16, batch_size=8,
                                        prompt="Article : {text} Topic :", tokenizer=model_dir)
    model = SideTuningModule(backbone=BackboneConfig(source=model_dir), num_classes=data.num_classes)
    strategy = ServerAssistedStrategy(embedded=ServerConfig(device="cpu", threads=1))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        callbacks=[QuantizedTransfer(codec="int8")])
    trainer.fit(model, data)
    print(json.dumps({"steps": trainer.global_step, "server_pid": strategy.server_pid,
                      "loaded": sorted(m for m in sys.modules
                                        if m == "lightning_mobillm.server" or m.startswith("lightning_mobillm.server."))}))
    """
)


def test_a_device_run_loads_no_server_module(tiny_llama_dir, tiny_data_file, tmp_path):
    """At module level or inside functions: a whole fit with an embedded server (a separate process)
    leaves no ``lightning_mobillm.server`` module in the device process."""
    proc = subprocess.run([sys.executable, "-c", DEVICE_RUN, str(tiny_llama_dir), str(tiny_data_file)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["server_pid"] not in (None, os.getpid())
    assert result["loaded"] == [], f"the device process loaded server modules: {result['loaded']}"


def test_only_the_flower_apps_import_flower():
    """Flower is an optional extra: nothing but the apps and their record helpers import ``flwr`` (the
    settings, device and bridge halves of :mod:`lightning_mobillm.flower` are Flower-free)."""
    graph = grimp.build_graph(PKG, include_external_packages=True, cache_dir=None)
    importers = {m for m in graph.modules if m.startswith(PKG)
                 and "flwr" in graph.find_modules_directly_imported_by(m)}
    assert importers <= {f"{PKG}.flower.apps", f"{PKG}.flower.fedavg", f"{PKG}.flower.records"}, sorted(importers)
    assert f"{PKG}.flower.apps" in importers
