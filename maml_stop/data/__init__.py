"""Stored traces and what learning reads from them: the parquet store (``store``), the in-memory corpus
(``corpus``), probe points as tensors (``batches``), support/query episodes (``episodes``) and the
Lightning datamodule (``datamodule``)."""
