"""Prompt datasets: synthetic arithmetic, JSONL/Parquet loaders, chat prompt building."""
