"""Tests of the RESIZE / HYBRID test strategies (p3m_jax.inference)."""

import numpy as np
import pytest
from skimage.transform import resize as skimage_resize

from p3m_jax.inference import strategies as inference
from tests.hlo_helpers import ynnpack_convolutions


class FakePredictor:
    """Deterministic per-pixel outputs from the input, recording the input shapes it saw."""

    def __init__(self):
        self.shapes = []

    def forward(self, x):
        assert x.ndim == 4 and x.shape[0] == 1 and x.shape[1] % 32 == 0 and x.shape[2] % 32 == 0, x.shape
        self.shapes.append(x.shape[1:3])
        red = x[..., :1]
        alpha = 1 / (1 + np.exp(-red))
        logits = np.concatenate([-red, np.zeros_like(red) + 0.3, red], axis=-1)
        return {"global": logits, "local": alpha, "fusion": alpha**2, "side2": logits, "side1": logits, "side0": logits}


def _image(rng, height, width):
    base = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "shape,out",
    [
        ((101, 75, 3), (32, 64)),
        ((40, 52), (97, 131)),
        ((64, 64), (64, 64)),
        ((110, 162, 3), (104, 160)),
        ((110, 300), (104, 150)),
    ],
)
def test_resize_matches_scikit_image(shape, out):
    rng = np.random.default_rng(0)
    image = rng.random(shape)
    np.testing.assert_array_equal(inference.resize_like_skimage(image, out), skimage_resize(image, out))
    image32 = image.astype(np.float32)
    got = inference.resize_like_skimage(image32, out)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, skimage_resize(image32, out))


def test_protocol_sizes():
    assert inference.protocol_size(1080, 1440, 0.5) == (512, 704)
    assert inference.protocol_size(1080, 1440, 1.0) == (1056, 1440)
    assert inference.protocol_size(4000, 5000, 1.0) == (1600, 1600)
    assert inference.protocol_size(50, 70, 0.5) == (32, 32)  # the authors' code would ask for 0 here


def test_resize_strategy_follows_the_authors_steps():
    rng = np.random.default_rng(1)
    image = _image(rng, 150, 97)
    fake = FakePredictor()
    got = inference.predict_resize(fake, image)
    # the authors' steps, with scikit-image itself
    small = skimage_resize(image, (64, 32)) * 255.0
    x = ((small / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32)
    fusion = FakePredictor().forward(x[None])["fusion"][0, :, :, 0]
    expected = skimage_resize(fusion, (150, 97))
    assert fake.shapes == [(64, 32)]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.shape == (150, 97)


def test_hybrid_strategy_combines_global_trimap_and_local_alpha():
    rng = np.random.default_rng(2)
    image = _image(rng, 130, 170)
    fake = FakePredictor()
    got = inference.predict_hybrid(fake, image)
    assert fake.shapes == [(64, 64), (128, 160)]
    small = skimage_resize(image, (64, 64)) * 255.0
    norm = lambda im: ((im / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32)  # noqa
    out_small = FakePredictor().forward(norm(small)[None])
    trimap = np.array([0, 128, 255], np.uint8)[np.argmax(out_small["global"][0], axis=-1)]
    trimap = skimage_resize(trimap, (130, 170)) * 255.0
    full = skimage_resize(image, (128, 160)) * 255.0
    local = skimage_resize(FakePredictor().forward(norm(full)[None])["local"][0, :, :, 0], (130, 170))
    weight = np.ones(trimap.shape)
    weight[trimap == 255] = 0
    weight[trimap == 0] = 0
    expected = trimap * (1.0 - weight) / 255 + local * weight
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got == 1).any() and (got == 0).any() and ((got > 0) & (got < 1)).any()


class OutputsPredictor(FakePredictor):
    """FakePredictor whose forward computes only the outputs asked for, as the exported files' predictor."""

    def __init__(self):
        super().__init__()
        self.asked = []

    def forward(self, x, outputs=None):
        self.asked.append(outputs)
        out = super().forward(x)
        return out if outputs is None else {name: out[name] for name in outputs}


def test_strategies_ask_a_predictor_that_can_for_the_outputs_they_use():
    image = _image(np.random.default_rng(2), 130, 170)
    predictor = OutputsPredictor()
    np.testing.assert_array_equal(
        inference.predict_hybrid(predictor, image), inference.predict_hybrid(FakePredictor(), image)
    )
    np.testing.assert_array_equal(
        inference.predict_resize(predictor, image), inference.predict_resize(FakePredictor(), image)
    )
    assert predictor.asked == [("global",), ("local",), ("fusion",)]


def test_quantize_truncates_like_the_authors():
    alpha = np.array([0.0, 0.999, 1.0, 1.2, -0.1, 0.5], np.float32)
    np.testing.assert_array_equal(inference.quantize(alpha), [0, 254, 255, 255, 0, 127])


def test_bucketed_runner_pads_and_crops():
    fake = FakePredictor()
    runner = inference.NetworkRunner(fake, bucket=128)
    x = np.random.default_rng(3).normal(size=(96, 160, 3)).astype(np.float32)
    out = runner(x)
    assert fake.shapes == [(128, 256)]
    assert out["fusion"].shape == (96, 160, 1)
    np.testing.assert_allclose(out["fusion"], FakePredictor().forward(x[None])["fusion"][0])  # per-pixel model
    with pytest.raises(ValueError, match="multiple of 32"):
        inference.NetworkRunner(fake, bucket=100)


def test_strategies_run_a_real_random_model():
    from p3m_jax.inference.predictor import Predictor

    predictor = Predictor.random("resnet34")
    image = _image(np.random.default_rng(4), 70, 90)
    for strategy in inference.STRATEGIES:
        alpha = inference.predict_alpha(predictor, image, strategy)
        assert alpha.shape == (70, 90) and np.isfinite(alpha).all()
        assert alpha.min() >= 0 and alpha.max() <= 1
    with pytest.raises(ValueError, match="strategy"):
        inference.predict_alpha(predictor, image, "crop")
    with pytest.raises(ValueError, match="RGB uint8"):
        inference.predict_alpha(predictor, image[..., 0], "resize")


def test_random_predictors_share_an_initializer_but_follow_their_seed():
    import jax

    from p3m_jax.inference.predictor import Predictor

    first, other_seed, same_seed = (Predictor.random("resnet34", seed=s) for s in (0, 1, 0))
    leaves = [jax.tree_util.tree_leaves(p.variables) for p in (first, other_seed, same_seed)]
    assert all(np.array_equal(a, c) for a, c in zip(leaves[0], leaves[2]))
    differing = sum(not np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1]))
    assert differing >= 90  # every randomly drawn kernel (BatchNorm scales, biases and statistics are constants)


def test_background_compilation_is_joined_by_forward_and_its_errors_reach_the_caller(monkeypatch):
    from p3m_jax.inference import predictor as predictor_lib

    predictor = predictor_lib.Predictor.random("resnet34")
    shape = (1, 64, 160, 3)  # a shape no other test compiles: the programs are shared process-wide
    x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    built = []
    program = predictor._program

    def recording_program(names):
        built.append(names)
        if names == ("side0",):
            raise RuntimeError("compilation failed")
        return program(names)

    monkeypatch.setattr(predictor, "_program", recording_program)
    requests = [(shape, ("global",)), (shape, ("local",))]
    predictor.compile_programs(requests, wait=False)
    predictor.compile_programs(requests, wait=False)  # already queued: compiled once
    local = predictor.forward(x, outputs=("local",))["local"]  # waits for its program
    predictor.forward(x, outputs=("global",))
    assert built == [("global",), ("local",)]  # in the order asked, each once
    assert not [k for k in predictor_lib._PENDING if k[-2] == shape]
    np.testing.assert_allclose(local, predictor.forward(x)["local"], rtol=1e-5, atol=1e-6)
    # A background compilation that fails says so to whoever needs its program.
    predictor.compile_programs([(shape, ("side0",))], wait=False)
    with pytest.raises(RuntimeError, match="compilation failed"):
        predictor.forward(x, outputs=("side0",))


def test_next_program_lowers_while_the_one_before_it_compiles(monkeypatch):
    import threading

    from p3m_jax.inference import predictor as predictor_lib

    predictor = predictor_lib.Predictor.random("resnet34")
    shape = (1, 64, 192, 3)  # a shape no other test compiles
    second_lowered = threading.Event()
    lower = predictor._lower

    def recording_lower(request):
        lowered = lower(request)
        if request[1] == ("local",):
            second_lowered.set()
        return lowered

    compile_program = predictor_lib.compile_inference_program
    overlapped = []

    def waiting_compile(lowered):
        if not overlapped:  # the first program: its compilation waits for the second's lowering
            overlapped.append(second_lowered.wait(timeout=120))
        return compile_program(lowered)

    monkeypatch.setattr(predictor, "_lower", recording_lower)
    monkeypatch.setattr(predictor_lib, "compile_inference_program", waiting_compile)
    predictor.compile_programs([(shape, ("global",)), (shape, ("local",))])
    assert overlapped == [True]  # lowered on its own thread, not after the first compilation
    x = np.random.default_rng(8).normal(size=shape).astype(np.float32)
    assert predictor.forward(x, outputs=("local",))["local"].shape == (1, 64, 192, 1)


def test_predictor_computes_only_the_outputs_asked_and_shares_programs():
    from p3m_jax.inference import predictor as predictor_lib

    predictor = predictor_lib.Predictor.random("resnet34")
    x = np.random.default_rng(5).normal(size=(1, 64, 96, 3)).astype(np.float32)
    full = predictor.forward(x)
    assert set(full) == {"global", "local", "fusion", "side2", "side1", "side0"}
    # HYBRID's two programs, compiled together; the same values as the full network's outputs.
    predictor.compile_programs([((1, 64, 96, 3), ("global",)), ((1, 64, 96, 3), ("local",))])
    compiled = len(predictor_lib._EXECUTABLES)
    only_global, only_local = predictor.forward(x, outputs=("global",)), predictor.forward(x, outputs=["local"])
    assert set(only_global) == {"global"} and set(only_local) == {"local"}
    np.testing.assert_allclose(only_global["global"], full["global"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(only_local["local"], full["local"], rtol=1e-5, atol=1e-6)
    # A new Predictor of the same model (the training loop makes one per validation) compiles nothing.
    again = predictor_lib.Predictor(predictor.arch, predictor.variables)
    np.testing.assert_array_equal(again.forward(x, outputs=("local",))["local"], only_local["local"])
    assert len(predictor_lib._EXECUTABLES) == compiled
    with pytest.raises(ValueError, match="unknown outputs"):
        predictor.forward(x, outputs=("alpha",))
    # The strategies go through these programs and agree with a predictor computing everything.
    image = _image(np.random.default_rng(6), 70, 90)
    runner = inference.NetworkRunner(predictor)
    everything = inference.NetworkRunner(type("Plain", (), {"forward": staticmethod(predictor.forward)})())
    for strategy in inference.STRATEGIES:
        np.testing.assert_allclose(
            inference.predict_alpha(runner, image, strategy),
            inference.predict_alpha(everything, image, strategy),
            atol=1e-5,
        )


def test_cpu_inference_programs_use_xla_convolutions_and_fall_back_when_refused(monkeypatch):
    # On the CPU the forward programs compile convolutions without YNNPACK (faster), with the same
    # outputs as XLA's default compilation; an XLA that refuses the option gets plain compiles.
    import jax
    import jax.numpy as jnp

    from p3m_jax.common import compile_options
    from p3m_jax.inference import predictor as predictor_lib

    predictor = predictor_lib.Predictor.random("resnet34")
    lowered = predictor._program(("local",)).lower(
        predictor.variables, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    )
    default = lowered.compile()
    ours = predictor_lib.compile_inference_program(lowered)
    assert ynnpack_convolutions(default) > 0 and ynnpack_convolutions(ours) == 0
    x = np.random.default_rng(8).normal(size=(1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(
        ours(predictor.variables, x)["local"], default(predictor.variables, x)["local"], rtol=1e-5, atol=1e-6
    )
    monkeypatch.setattr(
        compile_options, "CPU_CONVOLUTION_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_FUSION_TYPE"}
    )
    assert compile_options.compiler_options("cpu") is None
    assert ynnpack_convolutions(predictor_lib.compile_inference_program(lowered)) > 0
    # Other platforms keep XLA's defaults; a compilation error reaches the caller.
    assert compile_options.compiler_options("gpu") is None

    class FailingLowered:
        def compile(self, **options):
            raise RuntimeError("out of memory while compiling")

    with pytest.raises(RuntimeError, match="out of memory"):
        predictor_lib.compile_inference_program(FailingLowered())
