"""Differentiable evaluation of ONNX graphs on torch, weights keyed by ONNX name (see evaluator.py)."""

from toco_core.analysis.graph_eval.evaluator import GraphEvaluator
from toco_core.analysis.graph_eval.registry import supported_ops

__all__ = ["GraphEvaluator", "supported_ops"]
