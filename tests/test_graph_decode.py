"""The static decode step and its CUDA graphs (`models.graph_decode`, `LeanDecoder.step_static`).

On a CPU: the static step computes the lean step's logits (windows, Gemma's sandwich norms, int4),
a reused slot forgets its last generation, and the step is capturable: the same aten ops on the same
shapes at every position, and nothing read back to or created from the host. On a GPU (`cuda`): the
graphed generation gives transformers' greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptq_format.embedding import quantize_rows
from models import graph_decode, lean_decode
from models.graph_decode import SPARE_SLOTS, SlotPool, StaticSlot, bucket
from models.inference import GenerationOptions, generate
from models.int4 import QuantEmbedding

from .test_lean_decode import PROMPT, _float, _inputs, _int4, _teacher_forced
from .tiny_vlms import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _static_teacher_forced(
    model, tokens: list[int], capacity: int, slot: StaticSlot | None = None, *, graph: bool = False
) -> torch.Tensor:
    """The static step's logits for every position after the prompt, fed `tokens`."""
    with torch.inference_mode():
        inputs = {k: v.to(model.device) for k, v in _inputs().items()}
        logits, prompt_cache = lean_decode.prefill(model, inputs)
        lean = lean_decode.LeanDecoder.for_model(model)
        slot = (slot or StaticSlot(lean, capacity, graph=graph)).load(prompt_cache)
        got = [logits]
        for i, t in enumerate(tokens[:-1]):
            got.append(slot.step(t, PROMPT.shape[1] + i).clone())
    return torch.stack(got)


def _model(arch: str) -> torch.nn.Module:
    if arch == "mistral-window":
        model = _float("mistral")
        model.config.sliding_window = 6
        return model
    if arch == "int4":
        return _int4(_float("llama"))
    if arch == "gemma3-emb8":  # int8 embedding rows with Gemma's scale
        model = _float("gemma3")
        old = model.model.embed_tokens
        model.model.embed_tokens = QuantEmbedding(
            quantize_rows(old.weight.detach()), old.weight.device, model.dtype, like=old
        )
        return model
    return _float(arch)


TOKENS = [80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3", "gemma3-emb8", "mistral-window", "int4"])
def test_static_step_gives_the_lean_steps_logits(arch):
    """Masked full-capacity attention over a zero cache: the positions it masks add exact zeros. gemma3 and
    mistral-window slide past their 8- and 6-token windows within these 12 tokens."""
    model = _model(arch)
    _, lean = _teacher_forced(model, TOKENS)
    static = _static_teacher_forced(model, TOKENS, capacity=64)
    torch.testing.assert_close(static, lean, atol=2e-5, rtol=1e-5)


def test_a_reused_slot_forgets_its_last_generation():
    """A slot keeps the keys of a longer earlier answer past the new prompt: the mask must hide them."""
    model = _float("gemma3")
    lean = lean_decode.LeanDecoder.for_model(model)
    slot = StaticSlot(lean, 64, graph=False)
    fresh = _static_teacher_forced(model, TOKENS, 64)
    _static_teacher_forced(model, [200 + i for i in range(40)], 64, slot)  # fills 50 positions with other keys
    again = _static_teacher_forced(model, TOKENS, 64, slot)
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)


class _OpTrace(TorchDispatchMode):
    """Every aten op with its output shapes, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else (out,)
        self.ops.append((str(func), tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


# Ops a CUDA graph cannot hold: a value read back to the host, a tensor made from host data (a copy
# from pageable memory), or an output whose size depends on a tensor's values.
_HOST_OPS = ("aten._local_scalar_dense", "aten.item", "aten.lift_fresh", "aten.nonzero", "aten.masked_select")


def _trace(step, *args) -> list[tuple[str, tuple]]:
    with torch.inference_mode(), _OpTrace() as trace:
        step(*args)
    return trace.ops


@pytest.mark.parametrize("arch", ["gemma3", "gemma3-emb8", "int4"])
def test_static_step_is_capturable_the_same_ops_and_shapes_at_every_position(arch):
    model = _model(arch)
    with torch.inference_mode():
        _, prompt_cache = lean_decode.prefill(model, _inputs())
    lean = lean_decode.LeanDecoder.for_model(model)
    slot = StaticSlot(lean, 64, graph=False).load(prompt_cache)

    def static(token: int, pos: int) -> None:
        slot.token.fill_(token)
        slot.pos.fill_(pos)
        lean.step_static(slot.cache, slot.token, slot.pos)

    first, later = _trace(static, 80, 10), _trace(static, 81, 40)  # 40: past gemma3's 8-token window
    assert len(first) > 10 * len(lean.layers)
    assert first == later
    assert not [op for op, _ in first if op.startswith(_HOST_OPS)]
    # the checker can fail: the CPU's lean step makes its token tensor from a host int and reads only the
    # filled part of the cache, so its shapes change with the position
    cpu_cache = lean.start(prompt_cache, 64)
    dynamic = _trace(lean.step, cpu_cache, 80, 10)
    assert [op for op, _ in dynamic if op.startswith("aten.lift_fresh")]
    assert dynamic != _trace(lean.step, cpu_cache, 81, 11)


def test_a_failed_capture_decodes_without_a_graph_and_says_so(caplog):
    """Here the capture fails for want of a GPU; on one, an op a graph cannot hold would fail the same way."""
    model = _float("llama")
    _, lean_logits = _teacher_forced(model, TOKENS)
    lean = lean_decode.LeanDecoder.for_model(model)
    with caplog.at_level("WARNING", logger="models.graph_decode"):
        slot = StaticSlot(lean, 64, graph=True)
    assert slot.graph is None and "CUDA graph capture failed" in caplog.text
    torch.testing.assert_close(_static_teacher_forced(model, TOKENS, 64, slot), lean_logits, atol=2e-5, rtol=1e-5)


def test_capacity_buckets_and_the_slot_pool():
    assert [bucket(n) for n in (1, 256, 257, 1000, 1024, 1025)] == [256, 256, 512, 1024, 1024, 2048]
    lean = lean_decode.LeanDecoder.for_model(_float("llama"))
    pool = SlotPool(lean)
    slots = [pool.take(300) for _ in range(SPARE_SLOTS + 1)]
    assert {s.capacity for s in slots} == {512} and len({id(s) for s in slots}) == SPARE_SLOTS + 1
    assert all(s.graph is None for s in slots)  # CPU: no graphs
    for s in slots:
        pool.give_back(s)
    assert pool.idle() == {512: SPARE_SLOTS}
    assert pool.take(400) in slots
    with pytest.raises(ValueError, match="capacity"):
        slots[0].step(1, 512)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cuda_graph_generation_gives_transformers_greedy_tokens(arch):
    """float32 on a GPU, graphed steps against transformers' own decode; twice, so the second generation
    replays the pooled graph over a used cache."""
    tok = byte_tokenizer([])
    model = _float(arch).cuda()
    inputs = {k: v.cuda() for k, v in _inputs().items()}
    want = generate(model, tok, inputs, GenerationOptions(max_new_tokens=24, lean=False))
    for _ in range(2):
        got = generate(model, tok, inputs, GenerationOptions(max_new_tokens=24))
        assert got.decoder == "lean"
        assert (got.text, got.completion_tokens) == (want.text, want.completion_tokens)
    pool = graph_decode.pool_for(lean_decode.LeanDecoder.for_model(model))
    assert pool.idle() == {256: 1}
    assert pool.take(10).graph is not None


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["tinygemm-cuda", "gemlite"])
def test_cuda_graph_int4_logits_are_the_eager_steps_and_near_transformers(kernel):
    """int4 layers (bf16 activations) on a GPU: the replayed graph computes what the same step computes
    eagerly, and stays within bf16 rounding of transformers' forward."""
    from models.int4 import quantize_linears_in_place
    from models.int4.linear import KERNELS
    from quantizer.config import GridConfig, quant_config

    from .quantized_models import quantize_linears

    if KERNELS[kernel].unavailable(torch.device("cuda")) is not None:
        pytest.skip(KERNELS[kernel].unavailable(torch.device("cuda")))
    fp = _float("llama")
    weights = quantize_linears(fp, quant_config("rtn", grid=GridConfig(bits=4, group_size=32)))
    model = fp.to(device="cuda", dtype=torch.bfloat16)
    assert sum(quantize_linears_in_place(model, weights, kernel=kernel, device="cuda").values()) == len(weights)
    graphed = _static_teacher_forced(model, TOKENS, 64, graph=True)
    eager = _static_teacher_forced(model, TOKENS, 64, graph=False)
    torch.testing.assert_close(graphed, eager, atol=1e-3, rtol=1e-3)
    ids = torch.cat([PROMPT[0], torch.tensor(TOKENS)])[None].cuda()
    with torch.inference_mode():
        want = model(input_ids=ids).logits[0, PROMPT.shape[1] - 1 : -1].float()
    assert (graphed - want).abs().max() <= 0.03 * want.abs().max()
