"""Compression: pruning (`prune.py`) and int8 quantization (`quantize.py`)."""
