"""Judging a trained network: the early-exit rule and its inference, the final report
(report.json / report.md) and the plots."""
