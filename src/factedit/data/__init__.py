"""Text data: Wikipedia rows for key statistics."""

from factedit.data.wikipedia import SOURCES, PackedRows, WikipediaDataModule

__all__ = ["SOURCES", "PackedRows", "WikipediaDataModule"]
