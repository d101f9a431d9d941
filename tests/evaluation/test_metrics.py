"""BLEU/ROUGE against sacrebleu and rouge-score called directly."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from oloraplus.evaluation.metrics import compute_text_metrics

PREDICTIONS = [
    "The cat sat on the mat.",
    "Paris is the capital of France and its largest city.",
    "running quickly through the forests",
    "",
    "completely unrelated words here",
]
REFERENCES = [
    "The cat is sitting on the mat.",
    "The capital of France is Paris.",
    "He runs quickly through the forest.",
    "An empty prediction scores zero.",
    "Nothing in common at all.",
]


def test_matches_sacrebleu_and_rouge_score():
    result = compute_text_metrics(PREDICTIONS, REFERENCES)
    expected_bleu = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert result["bleu"] == pytest.approx(expected_bleu, abs=1e-9)
    assert 0 < result["bleu"] < 100
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES)]
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = 100 * sum(s[key].fmeasure for s in scores) / len(scores)
        assert result[key] == pytest.approx(expected, abs=1e-9), key
        assert 0 < result[key] < 100


def test_stemming_is_on():
    # "running"/"runs" and "forests"/"forest" only match after stemming.
    stemmed = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(REFERENCES[2], PREDICTIONS[2])
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False).score(REFERENCES[2], PREDICTIONS[2])
    assert stemmed["rouge1"].fmeasure > plain["rouge1"].fmeasure
    result = compute_text_metrics(PREDICTIONS[2:3], REFERENCES[2:3])
    assert result["rouge1"] == pytest.approx(100 * stemmed["rouge1"].fmeasure)


def test_bleu_is_a_corpus_score_not_a_mean_of_sentences():
    corpus = compute_text_metrics(PREDICTIONS, REFERENCES)["bleu"]
    sentence_mean = sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDICTIONS, REFERENCES)) / 5
    assert corpus != pytest.approx(sentence_mean)


def test_identical_texts_score_100():
    texts = ["the quick brown fox jumps over the lazy dog", "a second sentence with enough words in it"]
    result = compute_text_metrics(texts, texts)
    for key in ("bleu", "rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(100.0)


def test_signature_present():
    signature = compute_text_metrics(PREDICTIONS, REFERENCES)["bleu_signature"]
    bleu = sacrebleu.metrics.BLEU()
    bleu.corpus_score(PREDICTIONS, [REFERENCES])
    assert signature == str(bleu.get_signature())
    assert "tok:13a" in signature and "version:" in signature


@pytest.mark.parametrize(("predictions", "references"), [(["a", "b"], ["a"]), ([], ["a"]), ([], [])])
def test_bad_lengths_raise(predictions, references):
    with pytest.raises(ValueError):
        compute_text_metrics(predictions, references)
