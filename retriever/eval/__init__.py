"""Evaluation of retrieval + re-ranking + selection (``vlmrag eval``): metrics, COCO harness, reports."""
