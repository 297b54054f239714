"""Evaluation harness: perplexity and zero-shot accuracy with routed-FLOP accounting."""

from .loglik import Scored, encode_request, score_requests
from .perplexity import CORPORA, corpus_documents, perplexity, read_text_file
from .runner import evaluate, load_checkpoint
from .tasks import TASKS, evaluate_task, load_items

__all__ = [
    "CORPORA",
    "TASKS",
    "Scored",
    "corpus_documents",
    "encode_request",
    "evaluate",
    "evaluate_task",
    "load_checkpoint",
    "load_items",
    "perplexity",
    "read_text_file",
    "score_requests",
]
