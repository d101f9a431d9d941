"""Evaluation: eval loss on response tokens, generation, teacher-forced predictions, BLEU/ROUGE.

Depends on ``data``, ``method`` (the response-token loss) and ``models``; nothing here trains.
"""
