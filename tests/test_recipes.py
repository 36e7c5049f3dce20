"""Every shipped recipe, and every ``configs/`` piece composed onto one, is parsed by the real CLI entry point
and instantiated (model, data module, trainer with its strategy, callbacks and loggers) on a tiny stand-in
backbone and the tiny JSON data set: LightningCLI's ``run=False`` mode, so no server starts and nothing
trains. The assertions compare the instantiated objects with the YAML and with what each recipe is for (its
method class, strategy, token selection, codec), so a recipe with a wrong key, a wrong class or a broken
composition fails here instead of minutes into a real run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

import lightning_mobillm.cli as cli_module
from lightning_mobillm.assets import PACKAGED_MODELS
from lightning_mobillm.baselines import (
    FullFineTuneClassifier,
    LadderSideTuningClassifier,
    LoRAClassifier,
    MeZOClassifier,
    OnDeviceCausalLM,
    SplitLearningClassifier,
)
from lightning_mobillm.callbacks import ActivationCache, DeviceMonitor, GenerationEval, QuantizedTransfer
from lightning_mobillm.data import InstructionDataModule, TextClassificationDataModule
from lightning_mobillm.engine import BYTES_PER_PARAMETER
from lightning_mobillm.modules import (
    AdditiveAdapterModule,
    CausalLMSideModule,
    FedDeviceModule,
    SideTuningModule,
)
from lightning_mobillm.strategies import ServerAssistedStrategy

REPO = Path(__file__).resolve().parents[1]


def _shipped(folder: str) -> list[str]:
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / folder).glob("**/*.yaml"))


def _is_server_config(path: str) -> bool:
    """``serve --config`` files shipped beside a method's device recipes (``role:`` and ``server:``, no model)."""
    cfg = yaml.safe_load((REPO / path).read_text())
    return isinstance(cfg, dict) and "server" in cfg and "model" not in cfg


RECIPES = [r for r in _shipped("recipes") if not _is_server_config(r)]
SERVER_CONFIGS = [r for r in _shipped("recipes") if _is_server_config(r)]
CODECS = _shipped("configs/codecs")
BACKBONES = _shipped("configs/backbones")
DATA = _shipped("configs/data")
TRAINER = _shipped("configs/trainer")
QUICKSTART = "recipes/quickstart.yaml"
#: the recipes configs/codecs/*.yaml and recipes/README.md say a codec piece composes with: those whose callbacks
#: are [QuantizedTransfer, DeviceMonitor, ModelCheckpoint], the list a codec piece merges into entry by entry
CODEC_DOCUMENTED = (QUICKSTART, "recipes/demo/*.yaml", "recipes/pae/smollm2-bbc-fullseq.yaml")
CODEC_COMPOSABLE = [r for r in RECIPES if any(fnmatch(r, pattern) for pattern in CODEC_DOCUMENTED)]


@dataclass(frozen=True)
class Method:
    """What a recipe must build, beyond its YAML keys."""

    model: type
    strategy: type
    callbacks: tuple[type, ...]
    select: str | None = None  # ServerAssistedStrategy only
    codec: str | None = None  # QuantizedTransfer's, server-assisted recipes only


MOBILLM = (QuantizedTransfer, DeviceMonitor, ModelCheckpoint)
ON_DEVICE = (DeviceMonitor, ModelCheckpoint)
METHODS: dict[str, Method] = {
    QUICKSTART: Method(SideTuningModule, ServerAssistedStrategy, MOBILLM, "auto", "int8"),
    "recipes/demo/qwen2.5-coder-1.5b-mobillm.yaml": Method(SideTuningModule, ServerAssistedStrategy, MOBILLM,
                                                           "all", "int8"),
    "recipes/pae/smollm2-bbc.yaml": Method(AdditiveAdapterModule, ServerAssistedStrategy,
                                           (QuantizedTransfer, ActivationCache, DeviceMonitor, ModelCheckpoint),
                                           "loss", "int8"),
    "recipes/pae/smollm2-bbc-fullseq.yaml": Method(AdditiveAdapterModule, ServerAssistedStrategy, MOBILLM,
                                                   "all", "int8"),
    "recipes/baselines/full_ft.yaml": Method(FullFineTuneClassifier, SingleDeviceStrategy, ON_DEVICE),
    "recipes/baselines/lora.yaml": Method(LoRAClassifier, SingleDeviceStrategy, ON_DEVICE),
    "recipes/baselines/lst.yaml": Method(LadderSideTuningClassifier, SingleDeviceStrategy, ON_DEVICE),
    "recipes/baselines/mezo.yaml": Method(MeZOClassifier, SingleDeviceStrategy, ON_DEVICE),
    "recipes/baselines/split.yaml": Method(SplitLearningClassifier, SingleDeviceStrategy, ON_DEVICE),
    **{f"recipes/fed/{name}.yaml": Method(FedDeviceModule, SingleDeviceStrategy, (DeviceMonitor,))
       for name in ("smollm2-135m-bbc", "smollm2-135m-bbc-fleet", "gemma3-270m-bbc", "qwen2.5-coder-0.5b-bbc",
                    "tiny-device")},
    "recipes/sft/smollm2-bbc-headlines-lora.yaml": Method(OnDeviceCausalLM, SingleDeviceStrategy,
                                                          (GenerationEval, DeviceMonitor, ModelCheckpoint)),
    "recipes/sft/smollm2-bbc-headlines.yaml": Method(CausalLMSideModule, ServerAssistedStrategy,
                                                     (QuantizedTransfer, GenerationEval, DeviceMonitor, ModelCheckpoint),
                                                     "auto", "int8o"),
}
#: generative recipes (an InstructionDataModule): the tiny data's text is the prompt, its label the answer
GENERATIVE = [r for r in RECIPES if r.startswith("recipes/sft/")]
GENERATIVE_OVERRIDES = ["--data.init_args.prompt_field", "text", "--data.init_args.answer_field", "label"]
OWN_CALLBACKS = (QuantizedTransfer, ActivationCache, GenerationEval, DeviceMonitor, ModelCheckpoint)


def _yaml(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


@pytest.fixture
def tiny_overrides(tiny_llama_dir, tiny_data_file) -> list[str]:
    """The stand-ins: a tiny random Llama for the backbone, the tiny JSON lines for the data."""
    return ["--model.init_args.backbone.source", str(tiny_llama_dir),
            "--data.init_args.dataset", "json", "--data.init_args.data_files", str(tiny_data_file)]


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory) -> Path:
    """One ``datasets`` cache for this module's runs (the tiny JSON is converted to Arrow once), in pytest's tmp."""
    return tmp_path_factory.mktemp("hf-datasets")


@pytest.fixture
def cli_in(tmp_path, monkeypatch, datasets_cache):
    """Run ``lightning_mobillm.cli.main`` (the real entry point: its CLI class, defaults and W&B handling) with
    LightningCLI's ``run=False``, from ``tmp_path`` so the recipes' relative ``runs/`` (and W&B's folder) land
    there, the ``datasets`` cache in pytest's tmp too; return the CLI object. ``instantiate=False`` stops after parsing
    (``cli.config``), for compositions whose real backbone is not loaded here."""
    import datasets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)  # not ~/.cache
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [cli_module.PROG])  # LightningCLI warns if sys.argv has arguments too

    def run(configs: list[str], extra: Sequence[str] = (), instantiate: bool = True):
        made = []

        class InstantiateOnly(cli_module.MobiLLMCLI):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                made.append(self)
                super().__init__(*args, **{**kwargs, "run": False})

            def instantiate_classes(self) -> None:
                if instantiate:
                    super().instantiate_classes()

        monkeypatch.setattr(cli_module, "MobiLLMCLI", InstantiateOnly)
        argv = [arg for path in configs for arg in ("--config", str(REPO / path))]
        cli_module.main([*argv, *extra])
        (cli,) = made
        return cli

    return run


def _init_args(spec: dict | None) -> dict:
    return dict((spec or {}).get("init_args") or {})


def _check_strategy(strategy: ServerAssistedStrategy, init_args: dict) -> None:
    for key, value in init_args.items():
        if key == "server":
            assert strategy.server_address == value
        elif key == "embedded":
            assert {k: asdict(strategy.embedded)[k] for k in value} == value
        else:
            assert getattr(strategy, key) == value, key


def _check_callbacks(callbacks: list, specs: list[dict]) -> None:
    """Each callback of the YAML list was built once, with its init_args."""
    for spec in specs:
        module, name = spec["class_path"].rsplit(".", 1)
        built = [c for c in callbacks if type(c).__name__ == name and type(c).__module__.startswith(module)]
        assert len(built) == 1, f"{spec['class_path']}: {len(built)} instances"
        for key, value in _init_args(spec).items():
            assert getattr(built[0], key) == value, f"{name}.{key}"


def _check_loggers(loggers: list, specs: list[dict], tmp_path: Path) -> None:
    assert [type(lg).__name__ for lg in loggers] == [s["class_path"].rsplit(".", 1)[1] for s in specs]
    for logger, spec in zip(loggers, specs, strict=True):
        args = _init_args(spec)
        if isinstance(logger, CSVLogger):
            assert logger.name == args.get("name", "lightning_logs")
            assert (tmp_path / logger.save_dir).resolve().is_relative_to(tmp_path.resolve())
        elif isinstance(logger, WandbLogger):
            assert logger._wandb_init["name"] == args.get("name")
            assert logger._wandb_init["project"] == args["project"]
            assert (tmp_path / logger.save_dir).resolve().is_relative_to(tmp_path.resolve())


def test_every_recipe_has_an_expected_method():
    assert RECIPES, "no recipes found"
    assert set(RECIPES) == set(METHODS), "a recipe was added or removed: describe what it builds in METHODS"
    assert not (REPO / "recipes" / "codecs").exists(), "codec studies are configs/codecs/ pieces now"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_instantiates(recipe, cli_in, tiny_overrides, tiny_llama_dir, tmp_path):
    cfg, method = _yaml(recipe), METHODS[recipe]
    generative = recipe in GENERATIVE
    cli = cli_in([recipe], tiny_overrides + (GENERATIVE_OVERRIDES if generative else []))
    model, data, trainer = cli.model, cli.datamodule, cli.trainer

    # the model: the method's class, every init arg as the recipe sets it, the class count linked from data
    assert type(model) is method.model
    model_args = _init_args(cfg["model"])
    backbone = model_args.pop("backbone")
    assert model.hparams["backbone"] == {**model.hparams["backbone"], **backbone, "source": str(tiny_llama_dir)}
    for key, value in model_args.items():
        got = model.hparams[key]
        if key == "embedded":
            got = {k: got[k] for k in value}
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    if generative:  # no classes: W_o's width is the backbone's (32 for the tiny Llama), known once it is built
        assert type(data) is InstructionDataModule and model.hparams.get("num_classes") is None
    else:
        assert model.hparams["num_classes"] == 3 == data.num_classes
        assert type(data) is TextClassificationDataModule

    # the data module: every setting but the stand-in data set
    for key, value in _init_args(cfg["data"]).items():
        if key not in ("dataset", "data_files"):
            assert data.hparams[key] == value, key
    assert data.hparams["dataset"] == "json"

    # the trainer, its strategy, callbacks and loggers
    t = cfg["trainer"]
    assert isinstance(trainer.accelerator, CPUAccelerator)
    assert type(trainer.strategy) is method.strategy
    for key in ("max_epochs", "log_every_n_steps", "num_sanity_val_steps"):
        if key in t:
            assert getattr(trainer, key) == t[key], key
    if method.strategy is ServerAssistedStrategy:
        _check_strategy(trainer.strategy, _init_args(t["strategy"]))
        assert trainer.strategy.select == method.select
        (transfer,) = [c for c in trainer.callbacks if isinstance(c, QuantizedTransfer)]
        assert transfer.codec == method.codec
    else:
        assert t["strategy"] == "auto"
        assert not any(isinstance(c, QuantizedTransfer) for c in trainer.callbacks)
    own = sorted(type(c).__name__ for c in trainer.callbacks if isinstance(c, OWN_CALLBACKS))
    assert own == sorted(c.__name__ for c in method.callbacks)
    _check_callbacks(trainer.callbacks, t["callbacks"])
    _check_loggers(trainer.loggers, t["logger"], tmp_path)


@pytest.mark.parametrize("piece", CODECS)
def test_codec_piece_on_the_quickstart_changes_only_the_codec(piece, cli_in, tiny_overrides):
    codec = Path(piece).stem
    assert _init_args(_yaml(piece)["trainer"]["callbacks"][0])["codec"] == codec
    cli = cli_in([QUICKSTART, piece], tiny_overrides)
    quickstart = _yaml(QUICKSTART)["trainer"]
    trainer = cli.trainer
    (transfer,) = [c for c in trainer.callbacks if isinstance(c, QuantizedTransfer)]
    assert transfer.codec == codec
    assert transfer.measure_every_n_steps == 50  # the quickstart's, kept
    assert transfer.outlier_channels == 8
    # everything else is the quickstart's: the other callbacks with their settings, strategy, loggers
    others = [s for s in quickstart["callbacks"] if not s["class_path"].endswith("QuantizedTransfer")]
    _check_callbacks(trainer.callbacks, others)
    assert sorted(type(c).__name__ for c in trainer.callbacks if isinstance(c, OWN_CALLBACKS)) == sorted(
        c.__name__ for c in MOBILLM)
    assert type(cli.model) is SideTuningModule and type(trainer.strategy) is ServerAssistedStrategy
    _check_strategy(trainer.strategy, _init_args(quickstart["strategy"]))
    assert [lg.name for lg in trainer.loggers] == ["quickstart", "lightning_mobillm"]  # CSV name, W&B project


def _callback_classes(recipe: str) -> list[str]:
    return [s["class_path"].rsplit(".", 1)[1] for s in _yaml(recipe)["trainer"].get("callbacks", [])]


def test_codec_pieces_name_the_recipes_they_compose_with():
    """The recipes documented as codec-composable are exactly those with the pieces' callback list."""
    shape = _callback_classes(CODECS[0])
    assert shape == [c.__name__ for c in MOBILLM]
    assert all(_callback_classes(piece) == shape for piece in CODECS)
    assert [r for r in RECIPES if _callback_classes(r) == shape] == CODEC_COMPOSABLE
    docs = [(REPO / piece).read_text() for piece in CODECS] + [(REPO / "recipes/README.md").read_text()]
    for text in docs:
        assert all(pattern.removeprefix("recipes/") in text for pattern in CODEC_DOCUMENTED)


@pytest.mark.parametrize("recipe", [r for r in CODEC_COMPOSABLE if r != QUICKSTART])
def test_codec_piece_keeps_the_other_recipes_callback_settings(recipe, cli_in):
    cfg = cli_in([recipe, "configs/codecs/int4o.yaml"], instantiate=False).config
    merged = [c.as_dict() for c in cfg.trainer.callbacks]
    for got, spec in zip(merged, _yaml(recipe)["trainer"]["callbacks"], strict=True):
        assert got["class_path"] == spec["class_path"]
        want = {**_init_args(spec), **({"codec": "int4o", "outlier_channels": 8} if "codec" in got["init_args"]
                                       else {})}
        assert {k: got["init_args"][k] for k in want} == want


def test_codec_piece_replaces_a_longer_callback_list(cli_in):
    """Why the codec pieces name their recipes: on PAE's four callbacks the three-entry piece replaces the list
    (jsonargparse merges lists entry by entry only when the lengths match), and the cache is gone."""
    cfg = cli_in(["recipes/pae/smollm2-bbc.yaml", "configs/codecs/int4.yaml"], instantiate=False).config
    assert [c.class_path.rsplit(".", 1)[1] for c in cfg.trainer.callbacks] == _callback_classes(CODECS[0])


@pytest.mark.parametrize("piece", BACKBONES)
@pytest.mark.parametrize("recipe", [QUICKSTART, "recipes/baselines/lora.yaml"])
def test_backbone_piece_sets_only_the_source(piece, recipe, cli_in):
    alias = Path(piece).stem
    assert alias in PACKAGED_MODELS
    cfg = cli_in([recipe, piece], instantiate=False).config  # parse only: the real backbones are not loaded here
    recipe_model = _yaml(recipe)["model"]
    assert cfg.model.class_path == recipe_model["class_path"]
    backbone = cfg.model.init_args.backbone.as_dict()
    assert backbone == {**backbone, **recipe_model["init_args"]["backbone"], "source": alias, "gguf_file": None}


@pytest.mark.parametrize("piece", DATA)
@pytest.mark.parametrize("recipe", [QUICKSTART, "recipes/demo/qwen2.5-coder-1.5b-mobillm.yaml"])
def test_data_piece_sets_every_data_key(piece, recipe, cli_in):
    cfg = cli_in([recipe, piece], instantiate=False).config
    want = _yaml(piece)["data"]
    assert cfg.data.class_path == want["class_path"]
    assert {k: cfg.data.init_args[k] for k in want["init_args"]} == want["init_args"]


def test_bbc_news_piece_is_the_quickstarts_data():
    quickstart = _init_args(_yaml(QUICKSTART)["data"])
    piece = _init_args(_yaml("configs/data/bbc-news.yaml")["data"])
    assert {k: piece[k] for k in quickstart} == quickstart


def test_smoke_preset(cli_in, tiny_overrides):
    trainer = cli_in([QUICKSTART, "configs/trainer/smoke.yaml"], tiny_overrides).trainer
    assert (trainer.max_epochs, trainer.limit_train_batches, trainer.limit_val_batches) == (1, 4, 2)
    assert trainer.log_every_n_steps == 1 and trainer.val_check_interval == 1.0
    assert type(trainer.strategy) is ServerAssistedStrategy and trainer.strategy.pipeline_depth == 1


def _parsed_loggers(cfg) -> list[tuple[str, dict]]:
    return [(lg.class_path.rsplit(".", 1)[1], lg.init_args.as_dict()) for lg in cfg.trainer.logger]


def test_csv_only_preset_with_a_name(cli_in):
    cfg = cli_in([QUICKSTART, "configs/trainer/csv.yaml"], instantiate=False).config
    assert [(name, args["name"], args["save_dir"]) for name, args in _parsed_loggers(cfg)] == [
        ("CSVLogger", "lightning_logs", "runs")]
    named = cli_in([QUICKSTART, "configs/trainer/csv.yaml"], ["--trainer.logger.init_args.name", "quickstart"],
                   instantiate=False).config
    assert [(name, args["name"]) for name, args in _parsed_loggers(named)] == [("CSVLogger", "quickstart")]


@pytest.mark.parametrize("recipe", [QUICKSTART, "recipes/baselines/lst.yaml"])
def test_csv_wandb_preset_keeps_the_recipes_run_names(recipe, cli_in):
    cfg = cli_in([recipe, "configs/trainer/csv-wandb.yaml"], instantiate=False).config
    want = [(s["class_path"].rsplit(".", 1)[1], _init_args(s)) for s in _yaml(recipe)["trainer"]["logger"]]
    got = _parsed_loggers(cfg)
    assert [name for name, _ in got] == [name for name, _ in want] == ["CSVLogger", "WandbLogger"]
    for (_, args), (_, recipe_args) in zip(got, want, strict=True):
        assert {k: args[k] for k in recipe_args} == recipe_args


def test_synchronous_preset(cli_in):
    strategy = cli_in([QUICKSTART, "configs/trainer/synchronous.yaml"], instantiate=False).config.trainer.strategy
    assert strategy.class_path == "lightning_mobillm.strategies.ServerAssistedStrategy"
    args = strategy.init_args.as_dict()
    quickstart = _init_args(_yaml(QUICKSTART)["trainer"]["strategy"])
    assert args["pipeline_depth"] == 0 and quickstart["pipeline_depth"] == 1
    for key, value in quickstart.items():
        if key == "embedded":
            assert {k: args[key][k] for k in value} == value
        elif key != "pipeline_depth":
            assert args[key] == value, key


def test_every_piece_is_tested_and_commented():
    pieces = _shipped("configs")
    assert pieces and set(pieces) == set(CODECS + BACKBONES + DATA + TRAINER)
    assert {Path(c).stem for c in CODECS} == {"fp32", "fp16", "bf16", "int8", "int4", "int8o", "int4o"}
    for piece in pieces:
        for line in (REPO / piece).read_text().splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
                assert "#" in line, f"{piece}: a key without a comment: {line!r}"


#: blocks and width of the packaged backbones (their published configurations); the side server never loads
#: them, so a recipe's frames and hello are sized from these
PACKAGED_SHAPES = {"smollm2-135m": (30, 576), "qwen2.5-coder-0.5b": (24, 896), "qwen2.5-coder-1.5b": (28, 1536),
                   "minilm-l6": (6, 384)}
BBC_NEWS_CLASSES = 5


def _frame_bytes(tokens: int, taps: int, width: int, codec: str, outlier_channels: int) -> int:
    """The encoded size of a training frame of ``tokens`` token rows, extrapolated from two small real frames
    (every tensor of a frame grows linearly with its token rows)."""
    import torch

    from lightning_mobillm import protocol as P
    from lightning_mobillm.transport.frames import Frame, encode_frame

    def size(n: int) -> int:
        acts = torch.randn(n, taps, width)
        tensors = P.pack_acts(acts, torch.tensor([n]), codec, outlier_channels=outlier_channels)
        header = {"session": "x" * 80, "secret": "0" * 32, "step": 10**6, "codec": codec}
        return len(encode_frame(Frame(kind=P.TRAIN, header=header, tensors={**tensors, "labels": torch.zeros(1, dtype=torch.int64)})))

    small, large = size(4), size(8)
    return small + (large - small) * (tokens - 4) // 4


@pytest.mark.parametrize("recipe", [r for r in RECIPES if METHODS[r].strategy is ServerAssistedStrategy])
def test_every_shipped_recipe_fits_the_servers_default_limits(recipe, cli_in, tiny_overrides):
    """What a recipe's device sends (its largest frame, its token rows) and asks for at hello (taps, width,
    outputs, the side network's training memory) fits a default ``serve``, sized from the real backbone."""
    import torch

    from lightning_mobillm.server_config import ServerConfig
    from lightning_mobillm.specs import TapSpec

    limits = ServerConfig()
    cfg = _yaml(recipe)
    backbone = _init_args(cfg["model"])["backbone"]
    blocks, width = PACKAGED_SHAPES[backbone["source"]]
    taps = blocks if backbone.get("layers", "all") == "all" else len(backbone["layers"])
    generative = recipe in GENERATIVE
    cli = cli_in([recipe], tiny_overrides + (GENERATIVE_OVERRIDES if generative else []))
    model, data, strategy = cli.model, cli.datamodule, cli.trainer.strategy
    (transfer,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizedTransfer)]
    per_sample = 1 if strategy.select == "loss" else data.hparams["max_length"]  # auto: at most every token
    tokens = max(data.hparams["batch_size"], data.hparams["eval_batch_size"]) * per_sample
    frame_mb = _frame_bytes(tokens, taps, width, transfer.codec, transfer.outlier_channels) / 2**20
    assert tokens <= limits.max_tokens_per_frame
    assert frame_mb <= limits.max_frame_mb, f"{recipe}: largest frame {frame_mb:.0f} MB"
    assert taps <= limits.max_taps and width <= limits.max_width
    # the hello: the server builds this module from the hello's hparams and side config (sized on meta)
    spec = TapSpec(layers=list(range(taps)), hidden_size=width, arch="llama", is_decoder=True)
    outputs = width if generative else model.default_num_outputs(BBC_NEWS_CLASSES)
    with torch.device("meta"):
        side = type(model).from_hparams_dict({**model.server_hparams(), **model.side_config.module_kwargs()})
        side.build(spec, num_classes=outputs if generative else BBC_NEWS_CLASSES, num_outputs=outputs)
    assert outputs <= limits.max_outputs
    assert sum(p.numel() for p in side.parameters()) * BYTES_PER_PARAMETER / 2**20 <= limits.max_session_mb


@pytest.mark.parametrize("path", SERVER_CONFIGS)
def test_every_shipped_server_config_builds_its_server_config(path):
    """``recipes/**`` files for ``serve --config``: a known role and settings ``ServerConfig`` takes (its own
    checks included), every setting commented like the recipes'."""
    from lightning_mobillm.client import ROLES
    from lightning_mobillm.server_config import ServerConfig

    cfg = _yaml(path)
    assert set(cfg) <= {"role", "server"} and cfg.get("role", "side") in ROLES
    ServerConfig(**cfg["server"])
    uncommented = [line for line in (REPO / path).read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#") and "#" not in line
                   and not line.rstrip().endswith(":")]  # a section's own line needs no comment
    assert not uncommented, uncommented
