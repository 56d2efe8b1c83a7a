"""session_memory on real models: RSS growth split into the model's own (anonymous) memory and
onnxruntime's file-backed code pages."""

from __future__ import annotations

from toco_core.demo.train import demo_model
from toco_core.measure import session_memory, session_rss
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
