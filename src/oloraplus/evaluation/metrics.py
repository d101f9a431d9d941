"""Text metrics: corpus BLEU (sacrebleu) and ROUGE-1/2/L F1 (rouge-score).

BLEU is sacrebleu's corpus BLEU with its default 13a tokenisation, on a 0-100 scale; its
signature is returned so a reader knows exactly what was computed. ROUGE is the F1 of
rouge-score with ``use_stemmer=True``, averaged over prediction/reference pairs, times 100,
without bootstrap resampling.
"""

from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def compute_text_metrics(predictions: list[str], references: list[str]) -> dict:
    """Score predictions against one reference each: ``bleu``, ``rouge1``, ``rouge2``, ``rougeL``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    import sacrebleu  # loaded on first use: `import oloraplus` stays free of the metric libraries
    from rouge_score import rouge_scorer

    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(list(predictions), [list(references)])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    result = {"bleu": score.score}
    result.update({key: 100.0 * total / len(predictions) for key, total in totals.items()})
    result["bleu_signature"] = str(bleu.get_signature())
    return result
