"""Loss and search operations over a large class matrix, computed one class chunk at a time."""

from toolkit.ops.chunked_ce import chunked_cross_entropy, chunked_logsumexp, chunked_topk

__all__ = ["chunked_cross_entropy", "chunked_logsumexp", "chunked_topk"]
