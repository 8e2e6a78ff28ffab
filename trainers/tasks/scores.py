"""Scores of generated text against references: corpus BLEU and chrF (sacrebleu) and ROUGE-L,
each from statistics that add up over examples, batches and ranks, so a validation set split
over ranks and micro-batches scores exactly as the whole corpus scored at once would.

    BLEU    sacrebleu's corpus BLEU (n-gram matches and totals, hypothesis and reference length),
            its tokenizer chosen by `finetune.bleu_tokenize`
    chrF    sacrebleu's chrF (character n-grams up to 6, beta 2)
    rougeL  the mean over examples of ROUGE-L's F-measure (longest common subsequence of
            lowercased words, \\w+ so that words of every script count), x 100
"""

from __future__ import annotations

import re

import torch

WORDS = re.compile(r"\w+")


def rouge_l(hyp: str, ref: str) -> float:
    """ROUGE-L F-measure (0..1) of one hypothesis against one reference."""
    h, r = WORDS.findall(hyp.lower()), WORDS.findall(ref.lower())
    if not h or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for x in h:  # longest common subsequence, one row at a time
        row = [0]
        for j, y in enumerate(r):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, rc = lcs / len(h), lcs / len(r)
    return 2 * p * rc / (p + rc)


class TextScores:
    """The metrics `names` (bleu, chrf, rougeL): `stats` of a batch (float64, `size` long, summed
    over batches and ranks), then `scores` of the sums."""

    def __init__(self, names: list[str], bleu_tokenize: str = "13a") -> None:
        from sacrebleu.metrics import BLEU, CHRF

        self.names = list(names)
        self.bleu = BLEU(tokenize=bleu_tokenize) if "bleu" in names else None
        self.chrf = CHRF() if "chrf" in names else None
        # each metric's statistics per segment (sacrebleu's layout), as long as its orders make them
        self.widths = {"rougeL": 2, **{n: len(m._extract_corpus_statistics(["a b"], [["a b"]])[0])
                                       for n, m in (("bleu", self.bleu), ("chrf", self.chrf)) if m is not None}}
        self.size = sum(self.widths[n] for n in self.names)

    def stats(self, hyps: list[str], refs: list[str]) -> torch.Tensor:
        parts = []
        for name in self.names:
            if name == "rougeL":
                parts.append([sum(rouge_l(h, r) for h, r in zip(hyps, refs, strict=True)), float(len(hyps))])
                continue
            metric = self.bleu if name == "bleu" else self.chrf
            rows = metric._extract_corpus_statistics(hyps, [refs])  # sacrebleu's per-segment statistics
            parts.append([float(sum(col)) for col in zip(*rows, strict=True)] if rows else [0.0] * self.widths[name])
        return torch.tensor([x for p in parts for x in p], dtype=torch.float64)

    def scores(self, stats: torch.Tensor) -> dict[str, float]:
        out, at = {}, 0
        for name in self.names:
            part = stats[at : at + self.widths[name]].tolist()
            at += self.widths[name]
            if name == "rougeL":
                out[name] = 100.0 * part[0] / part[1] if part[1] else 0.0
                continue
            metric = self.bleu if name == "bleu" else self.chrf
            out[name] = float(metric._compute_score_from_stats([int(round(x)) for x in part]).score)
        return out
