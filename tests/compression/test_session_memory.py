"""session_memory on real models: RSS growth split into the model's own (anonymous) memory and
onnxruntime's file-backed code pages."""

from __future__ import annotations

from toco_core.demo.train import demo_model
from toco_core.measure import PendingMemory, session_memory, session_rss
from toco_core.onnx_model import compressible_weights, load_model

MIB = 2**20


def test_rss_splits_into_the_models_own_memory_and_shared_code_pages():
    lenet, mlp = demo_model("lenet5"), demo_model("mlp")
    small, large = (session_memory(p.read_bytes(), (1, 1, 28, 28)) for p in (lenet, mlp))
    assert small is not None and large is not None
    for mem in (small, large):
        assert mem.anon is not None and mem.file is not None and mem.anon > 0 and mem.file > 0
        assert abs(mem.rss - mem.anon - mem.file) < MIB, mem  # nothing else (shmem) grows
    # the MLP holds ~0.8 MB more float weights than LeNet-5: they land in the anonymous part,
    # while the library pages are the same whichever model paged them in
    extra = 4 * sum(sum(i.size for i in compressible_weights(load_model(p))) * s for p, s in ((mlp, 1), (lenet, -1)))
    assert large.anon - small.anon >= 0.5 * extra, (small, large, extra)
    assert abs(large.file - small.file) < MIB, (small, large)


def test_session_rss_is_the_total_and_none_for_a_model_onnxruntime_cannot_load():
    rss = session_rss(demo_model("lenet5").read_bytes(), (1, 1, 28, 28))
    assert rss is not None and rss > 10 * MIB  # the session and its code pages, whatever the model
    assert session_memory(b"not a model", (1, 1, 28, 28)) is None


def test_the_measuring_child_loads_onnxruntime_but_not_onnx():
    """Every self-test starts the child (base, then each candidate): onnx with ml_dtypes was 0.9 of its 1.3 s."""
    import subprocess
    import sys

    code = ("import sys, runpy\nsys.argv = ['measure', sys.argv[1], '{\"\": [1, 1, 28, 28]}']\n"
            "runpy.run_module('toco_core.measure', run_name='__main__')\n"
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'ml_dtypes', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(demo_model("lenet5"))], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    *_, rss, loaded = out.stdout.strip().splitlines()
    assert int(rss) > 10 * MIB and loaded == "['onnxruntime']", out.stdout


def test_measurements_side_by_side_each_count_their_own_process():
    """recompress runs the base's child while the int8 anchor is built and measured: two children at
    once must each report what one alone reports (their shared library pages are counted in both)."""
    lenet, mlp = demo_model("lenet5").read_bytes(), demo_model("mlp").read_bytes()
    alone = [session_memory(m, (1, 1, 28, 28)) for m in (lenet, mlp)]
    pending = [PendingMemory(m, (1, 1, 28, 28)) for m in (lenet, mlp)]
    together = [p.result() for p in pending]
    for a, t in zip(alone, together, strict=True):
        assert a is not None and t is not None
        assert abs(a.rss - t.rss) < 2 * MIB, (a, t)
    # the MLP's extra float weights are in its child's number, not in LeNet-5's
    extra = 4 * sum(sum(i.size for i in compressible_weights(load_model(demo_model(n)))) * s
                    for n, s in (("mlp", 1), ("lenet5", -1)))
    assert together[1].anon - together[0].anon >= 0.5 * extra, (together, extra)
    assert pending[0].result() is None  # read once


def test_a_cancelled_measurement_ends_its_child_and_leaves_no_file():
    pending = PendingMemory(demo_model("mlp").read_bytes(), (1, 1, 28, 28))
    path, proc = pending._path, pending._proc
    assert path.exists()
    pending.cancel()
    assert proc.returncode is not None and not path.exists()
    assert pending.result() is None


def test_paired_latency_ratio_tells_a_heavier_model_from_the_same_one():
    """The latency gate's re-measure interleaves the two sessions' runs: a model against itself
    comes out near 1, a chain of four 512x512 products against one clearly above it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from toco_core.measure import interleaved_p50s

    def matmuls(n: int, depth: int) -> bytes:
        nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}" if i < depth - 1 else "y"])
                 for i in range(depth)]
        graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                                  [numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    one, four, x1 = matmuls(512, 1), matmuls(512, 4), np.ones((1, 512), np.float32)
    a, b = interleaved_p50s([one, matmuls(512, 1)], x1, threads=1)
    assert 0.5 < a / b < 2.0
    slow, fast = interleaved_p50s([four, one], x1, threads=1)
    assert slow / fast > 1.5
