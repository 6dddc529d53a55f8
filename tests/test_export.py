"""Compile, trace and export: torch.compile (dynamic batch), torch.export with a dynamic batch and with dynamic
height and width, torchvision's fx feature extraction, torch.jit.script, and ONNX run in onnxruntime, each
equal to eager for plain and distilled models."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from deit_registry import DeiT

CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def tiny(distilled: bool = False, **kwargs) -> DeiT:
    torch.manual_seed(0)
    return DeiT(**{**CFG, "distilled": distilled, **kwargs}).eval()


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


@pytest.mark.slow  # compiles with inductor: about a minute on 2 CPU cores
def test_torch_compile_dynamic_batch_without_recompiling():
    model = tiny(distilled=True)
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images(2)), model(images(2)), atol=1e-5, rtol=1e-5)
        with torch.compiler.set_stance("fail_on_recompile"):  # a new batch size reuses the graph
            torch.testing.assert_close(compiled(images(3)), model(images(3)), atol=1e-5, rtol=1e-5)


def test_dynamo_captures_one_graph_with_gelu_out_of_place():
    """Under torch.compile the model is one graph (no break at the eager GELU-in-place check) whose GELU is
    timm's, out of place: inductor plans buffers itself."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    model = tiny()
    with torch.no_grad():
        out = torch.compile(model, backend=backend, fullgraph=True)(images(2))
        torch.testing.assert_close(out, model(images(2)), rtol=0, atol=0)
    assert len(graphs) == 1 and "gelu(" in graphs[0] and "gelu_" not in graphs[0]


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_torch_export_dynamic_batch(distilled):
    from torch.export import Dim, export

    model = tiny(distilled)
    program = export(model, (images(2),), dynamic_shapes={"x": {0: Dim("batch", min=1, max=256)}})
    exported = program.module()
    with torch.no_grad():
        for batch in (1, 3):
            torch.testing.assert_close(exported(images(batch)), model(images(batch)))


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_torch_export_dynamic_height_and_width(distilled):
    """One exported program for every size (multiples of the patch): the position embedding is resampled
    inside the graph, not specialised to the example's grid."""
    from torch.export import Dim, export

    model = tiny(distilled, dynamic_img_size=True)
    h, w = Dim("h", min=1, max=32), Dim("w", min=1, max=32)
    shapes = {"x": {0: Dim("batch", min=1, max=64), 2: 8 * h, 3: 8 * w}}
    example = torch.randn(2, 3, 48, 40)
    program = export(model, (example,), dynamic_shapes=shapes)
    exported = program.module()
    with torch.no_grad():
        for size in ((32, 32), (16, 72), (48, 40)):  # the built size (no resampling in eager), a wide one
            x = torch.randn(3, 3, *size)
            torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed", "dynamic-size"])
def test_torchvision_feature_extractor_without_tracer_options(dynamic):
    """torchvision's fx feature extraction as with timm's own ViT: no leaf modules, no concrete arguments."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = tiny(True, dynamic_img_size=dynamic)
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "last", "head": "logits"})
    x = images(2) if not dynamic else torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        out = extractor(x)
        expected = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
        torch.testing.assert_close(out["last"][:, model.num_prefix_tokens :], expected[0])
        torch.testing.assert_close(out["logits"], model.head(model.forward_features(x)[:, 0]))
    with pytest.raises(ValueError, match="float image tensor"):  # eager checks are skipped in the graph only
        model(images(2).to(torch.uint8))


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_torch_jit_script(distilled):
    model = tiny(distilled, dynamic_img_size=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still used
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images(2)), model(images(2)))
        other = torch.randn(1, 3, 48, 64)
        torch.testing.assert_close(scripted(other), model(other))
        torch.testing.assert_close(scripted.forward_features(images(1)), model.forward_features(images(1)))


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["fixed", "dynamic"])
@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "distilled"])
def test_onnx_export_matches_eager_in_onnxruntime(distilled, dynamic_batch):
    import onnxruntime as ort

    model = tiny(distilled)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the input checks, constant for a fixed C/H/W
        torch.onnx.export(
            model,
            (images(2),),
            buffer,
            dynamo=False,  # the TorchScript-based exporter: no onnxscript dependency
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for batch in (1, 3) if dynamic_batch else (2,):
        x = images(batch)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4
    if not dynamic_batch:
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        with pytest.raises(InvalidArgument, match="invalid dimensions"):  # the batch is baked in
            session.run(None, {"images": images(3).numpy()})
