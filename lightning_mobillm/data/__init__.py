"""Data modules and offline corpora."""

from lightning_mobillm.data.instruction import IGNORE_INDEX, InstructionCollator, InstructionDataModule
from lightning_mobillm.data.sources import OFFLINE_SOURCES, load_bbc_news, load_vitaminc
from lightning_mobillm.data.text_classification import (
    PadCollator,
    TextClassificationDataModule,
    TokenizedSplit,
    encode_prompts,
    stratified_split,
)

__all__ = [
    "IGNORE_INDEX",
    "InstructionCollator",
    "InstructionDataModule",
    "OFFLINE_SOURCES",
    "PadCollator",
    "TextClassificationDataModule",
    "TokenizedSplit",
    "encode_prompts",
    "load_bbc_news",
    "load_vitaminc",
    "stratified_split",
]
