"""Evaluation: eval loss on response tokens (and teacher-forced predictions from it), generation, BLEU/ROUGE.

Depends on ``data``, ``method`` (the response-token loss) and ``models``; nothing here trains.
"""
