"""Evaluation: metrics and the confusion matrix (``evaluate``), class probabilities for image
files (``predict``), ONNX export (``export.export_onnx``), the HTML/Markdown report
(``report.write_report``) and the README's results table (``results.collect``,
``results.update_readme``)."""

from vggkit.evaluation.evaluator import evaluate, format_evaluation
from vggkit.evaluation.predictor import format_predictions, predict

__all__ = ["evaluate", "format_evaluation", "format_predictions", "predict"]
