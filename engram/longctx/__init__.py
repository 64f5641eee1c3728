"""Long-context evaluation: RULER-style tasks answered by the exact decoder, and the loss of
long held-out documents (``engram eval long-context``). The task generators are
``engram.data.retrieval`` (the library: data preparation writes synthetic retrieval documents with them)."""

from engram.longctx.evaluate import evaluate_long_context, fit, long_document_loss, run_tasks

__all__ = ["evaluate_long_context", "fit", "long_document_loss", "run_tasks"]
