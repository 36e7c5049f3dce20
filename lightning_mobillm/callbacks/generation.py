"""Generation on the device with the trained side network: validation metrics and written predictions.

:class:`GenerationEval` runs after each validation epoch (or every ``every_n_epochs``): during ``fit`` it first
downloads the side network from the server (the device's copy is otherwise stale), then generates for the data
module's fixed validation subset (``generate_samples``, left-padded prompts) with the stock ``generate``
through :class:`~lightning_mobillm.generation.SideGeneration`, and logs ROUGE-1/2/L (torchmetrics, offline:
``rougeLsum`` is left out because it needs a download) or exact match against every reference. During
``test`` it generates for the test split and logs ``test/<metric>``. During ``predict`` the strategy generates for
each batch; with ``output`` set, the texts are written as JSON lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["GenerationEval", "exact_match", "rouge_scores"]

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Share of predictions equal to one of their references (case and spacing ignored)."""
    if not predictions:
        return 0.0
    hits = sum(_normalize(p) in {_normalize(r) for r in refs} for p, refs in zip(predictions, references))
    return hits / len(predictions)


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (the best reference of each sample), through torchmetrics."""
    from torchmetrics.text.rouge import ROUGEScore

    metric = ROUGEScore(rouge_keys=ROUGE_KEYS, accumulate="best")
    scores = metric(list(predictions), [list(r) for r in references])
    return {key: float(scores[f"{key}_fmeasure"]) for key in ROUGE_KEYS}


class GenerationEval(L.Callback):
    """Generate on the device with the side network and score it (see the module's docstring).

    Args:
        metric: ``rouge`` (ROUGE-1/2/L F-measures) or ``exact_match``.
        max_new_tokens: tokens generated per prompt.
        every_n_epochs: generate after every n-th validation epoch (generation costs far more than
            teacher-forced validation).
        samples: how many validation samples (default: the data module's ``generate_samples``).
        output: a JSON-lines file for ``predict``'s texts (``{"index", "text"}``; nothing is written when None).
        generate_kwargs: passed to ``generate`` (``num_beams``, ``do_sample``, ``temperature``...).
        test_samples: how many test samples ``test`` generates for (default: all of them).
    """

    def __init__(self, metric: str = "rouge", max_new_tokens: int = 32, every_n_epochs: int = 1,
                 samples: int | None = None, output: str | None = None,
                 generate_kwargs: dict[str, Any] | None = None, test_samples: int | None = None) -> None:
        if metric not in ("rouge", "exact_match"):
            raise ValueError(f"metric must be 'rouge' or 'exact_match', got {metric!r}")
        if max_new_tokens < 1 or every_n_epochs < 1:
            raise ValueError("max_new_tokens and every_n_epochs must be >= 1")
        self.metric, self.max_new_tokens, self.every_n_epochs = metric, max_new_tokens, every_n_epochs
        self.samples, self.output, self.test_samples = samples, output, test_samples
        self.generate_kwargs = dict(generate_kwargs or {})
        self.last: dict[str, Any] = {}  # the last validation's texts and scores

    def score(self, texts: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
        if self.metric == "exact_match":
            return {"exact_match": exact_match(texts, references)}
        return rouge_scores(texts, references)

    def generate(self, trainer: L.Trainer, pl_module: Any, batches: Any) -> list[tuple[int, str]]:
        """The module's own generation (its ``generate_texts``: the side network's hooks, or the adapted model)."""
        generate = getattr(pl_module, "generate_texts", None)
        if generate is None:
            raise TypeError(f"GenerationEval needs a generative module (with generate_texts); "
                            f"{type(pl_module).__name__} has none")
        stops = getattr(trainer.datamodule, "stop_token_ids", None)
        return generate(batches, max_new_tokens=self.max_new_tokens, stop_token_ids=stops, **self.generate_kwargs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        if trainer.sanity_checking or (fitting and (trainer.current_epoch + 1) % self.every_n_epochs):
            return
        fetch = getattr(trainer.strategy, "fetch_server_state", None)
        if fitting and fetch is not None:  # the server holds the trained side network
            pl_module.load_state_dict(fetch(model_only=True)["model"])
        dm = trainer.datamodule
        loader = dm.generation_dataloader("validation", self.samples)
        produced = self.generate(trainer, pl_module, loader)
        texts = [t for _, t in produced]
        refs = dm.references("validation", len(texts))
        scores = self.score(texts, refs)
        self.last = {"texts": texts, "references": refs, **scores}
        pl_module.log_dict({f"val/{k}": v for k, v in scores.items()}, prog_bar=True)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Generate for the test split (its first ``test_samples``, default all) and log ``test/<metric>``."""
        dm = trainer.datamodule
        produced = self.generate(trainer, pl_module, dm.generation_dataloader("test", self.test_samples))
        texts = [t for _, t in produced]
        refs = dm.references("test", len(texts))
        scores = self.score(texts, refs)
        self.last_test = {"texts": texts, "references": refs, **scores}
        pl_module.log_dict({f"test/{k}": v for k, v in scores.items()})

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.output is None or not isinstance(outputs, dict) or "texts" not in outputs:
            return
        path = Path(self.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w" if batch_idx == 0 else "a", encoding="utf-8") as f:
            for index, text in zip(outputs["index"], outputs["texts"]):
                f.write(json.dumps({"index": int(index), "text": text}) + "\n")
