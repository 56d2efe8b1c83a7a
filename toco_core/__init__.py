"""TOCO core: tolerance analysis and device-aware compression of ONNX models.

Pure functions and plain data types. Torch is imported only under
``toco_core.analysis`` (the server side); everything else runs on an edge box.
"""

__version__ = "0.1.0"
