"""Streaming checkpoint rewrite: lazy reader, slicing, shard writer, config patch."""

from mfprune.rewrite.rewriter import RewriteResult, rewrite_checkpoint

__all__ = ["RewriteResult", "rewrite_checkpoint"]
