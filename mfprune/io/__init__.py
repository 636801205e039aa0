"""Byte-level safetensors I/O: validating header reader and streaming shard writer."""
