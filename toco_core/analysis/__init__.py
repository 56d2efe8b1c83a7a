"""Server-side analysis (torch): differentiable ONNX evaluation, Fisher, QBC, tolerance analysis."""
