"""The benchmark's profile summary: every HLO op's time lands on the network part that emitted it."""

import gzip
import json

import pytest

from profile_trace import network_part, time_by_network_part

# op_name metadata as XLA:CPU's compiled train step carries it (ResNet-34, 512x512).
FORWARD_STEM = "jit(train_step)/jvp(P3MNet)/encoder/conv1/jit(same_conv)/cond/branch_0_fun/conv_general_dilated"
BACKWARD_TFI = (
    "jit(train_step)/transpose(jvp(P3MNet))/decoder/tfi_0/conv1/jit(same_conv)/cond/"
    "branch_0_fun/while/body/closed_call/dot_general"
)
LOSS = "jit(train_step)/jvp()/reduce_sum"


@pytest.mark.parametrize(
    "op_name,expected",
    [
        (FORWARD_STEM, ("forward", "encoder/conv1")),
        (BACKWARD_TFI, ("backward", "decoder/tfi_0")),
        ("jit(train_step)/transpose(jvp(P3MNet))/encoder/select_n", ("backward", "encoder")),
        ("jit(train_step)/jvp(P3MNet)/add;jit(train_step)/jvp(P3MNet)/decoder/mul", ("forward", "network")),
        (LOSS, ("forward", "loss and optimizer")),
    ],
)
def test_network_part_names_the_module_and_the_pass(op_name, expected):
    assert network_part(op_name) == expected


def test_time_by_network_part_sums_trace_events_per_part(tmp_path):
    hlo = "\n".join(
        [
            f"  %ynn_fusion.7 = f32[1,512,512,64]{{3,2,1,0}} fusion(%a, %b), kind=kCustom, "
            f'metadata={{op_name="{FORWARD_STEM}" stack_frame_id=1}}',
            f'  %dot_general.3 = f32[576,64]{{1,0}} dot(%c, %d), metadata={{op_name="{BACKWARD_TFI}"}}',
            f'  ROOT %reduce.1 = f32[] reduce(%e, %f), metadata={{op_name="{LOSS}"}}',
            "  %transpose_copy_fusion.2 = f32[3,3,64,64]{3,2,1,0} fusion(%g), kind=kLoop",
        ]
    )
    events = [
        {"ph": "X", "name": "ynn_fusion", "dur": 3000.0, "args": {"hlo_op": "ynn_fusion.7"}},
        # A loop body's op runs once per iteration: every run counts.
        {"ph": "X", "name": "dot_general", "dur": 1000.0, "args": {"hlo_op": "dot_general.3"}},
        {"ph": "X", "name": "dot_general", "dur": 1500.0, "args": {"hlo_op": "dot_general.3"}},
        {"ph": "X", "name": "reduce", "dur": 200.0, "args": {"hlo_op": "reduce.1"}},
        {"ph": "X", "name": "transpose_copy_fusion", "dur": 400.0, "args": {"hlo_op": "transpose_copy_fusion.2"}},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000.0},  # no HLO op: not counted
        {"ph": "i", "name": "marker", "args": {"hlo_op": "ynn_fusion.7"}},  # not a duration
    ]
    trace = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
    trace.parent.mkdir(parents=True)
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)

    summary = time_by_network_part(str(tmp_path), hlo, top_ops=3)

    assert summary["parts"] == [
        ("forward", "encoder/conv1", pytest.approx(0.003)),
        ("backward", "decoder/tfi_0", pytest.approx(0.0025)),
        ("-", "no metadata (made by XLA)", pytest.approx(0.0004)),
        ("forward", "loss and optimizer", pytest.approx(0.0002)),
    ]
    assert [op for op, *_ in summary["ops"]] == ["ynn_fusion.7", "dot_general.3", "transpose_copy_fusion.2"]
    assert summary["ops"][1][1:] == (pytest.approx(0.0025), "backward", "decoder/tfi_0", "dot_general")


def test_time_by_network_part_without_a_trace_is_empty(tmp_path):
    assert time_by_network_part(str(tmp_path), "") == {"parts": [], "ops": []}


def test_time_by_network_part_counts_device_kernels_not_their_host_launches(tmp_path):
    hlo = f'  %fusion.1 = f32[8]{{0}} fusion(%a), metadata={{op_name="{FORWARD_STEM}"}}'
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "name": "launch", "dur": 50.0, "args": {"hlo_op": "fusion.1"}},
        {"ph": "X", "pid": 2, "name": "kernel", "dur": 700.0, "args": {"hlo_op": "fusion.1"}},
    ]
    trace = tmp_path / "host.trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = time_by_network_part(str(tmp_path), hlo)
    assert summary["parts"] == [("forward", "encoder/conv1", pytest.approx(0.0007))]


def _write_trace(folder, events):
    trace = folder / "plugins" / "profile" / "run" / "gpu.trace.json.gz"
    trace.parent.mkdir(parents=True)
    header = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": header + events}, f)


def _device_event(kernel, hlo_op, microseconds):
    return {"ph": "X", "pid": 2, "name": kernel, "dur": float(microseconds), "args": {"hlo_op": hlo_op}}


def test_command_buffer_kernels_count_for_their_fusion(tmp_path):
    # XLA:GPU runs runs of thunks as CUDA graphs: the kernels' events name the command buffer as
    # hlo_op and the fusion (with "_" for ".") or a library kernel as the event's name.
    hlo = "\n".join(
        [
            "  %loop_select_fusion.9 = bf16[4] fusion(%p), kind=kLoop, "
            'metadata={op_name="jit(train_step)/transpose(jvp(P3MNet))/decoder/sbfi_0/select_n"}',
            "  %cudnn-conv.3 = bf16[4] custom-call(%p), "
            'metadata={op_name="jit(train_step)/jvp(P3MNet)/encoder/conv1/conv_general_dilated"}',
            "  %command_buffer_7 = bf16[4] call(%p), to_apply=%command_buffer",
        ]
    )
    _write_trace(
        tmp_path,
        [
            _device_event("loop_select_fusion_9", "command_buffer_7", 900),
            _device_event("sm90_xmma_wgrad_implicit_gemm_bf16<int, 3>", "command_buffer_7", 300),
            _device_event("sm90_xmma_fprop_implicit_gemm", "cudnn-conv.3", 200),
        ],
    )
    result = time_by_network_part(str(tmp_path), hlo)
    parts = {(d, p): round(t * 1e6) for d, p, t in result["parts"]}
    assert parts == {
        ("backward", "decoder/sbfi_0"): 900,
        ("-", "library kernels in command buffers"): 300,
        ("forward", "encoder/conv1"): 200,
    }
    assert [op for op, *_ in result["ops"]] == [
        "loop_select_fusion.9",
        "sm90_xmma_wgrad_implicit_gemm_bf16",
        "cudnn-conv.3",
    ]


def test_step_flops_without_the_backend_cost_analysis(monkeypatch):
    # The GPU plugin's client cannot analyse an uncompiled module (jax answers None): the
    # FLOPs then come from the host's CPU client, and are the same.
    import jax
    import jax.numpy as jnp

    import bench_train_step as benchmark

    step = jax.jit(lambda w, x: jnp.tanh(x @ w))
    w, x = jax.ShapeDtypeStruct((128, 32), jnp.float32), jax.ShapeDtypeStruct((64, 128), jnp.float32)
    expected = benchmark.step_flops(step, w, x, 1)
    assert expected >= 2 * 64 * 128 * 32
    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", lambda self: None)
    assert benchmark.step_flops(step, w, x, 2) == expected / 2
