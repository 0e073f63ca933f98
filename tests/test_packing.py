"""Packed forward passes (engine/packing.py) equal the padded rectangle: log-probs, entropies,
values and parameter gradients, for shared and distinct prompts of different lengths, completions
of different lengths (one token, none), and multi-turn completions with environment tokens."""

import pytest
import torch

from advantage.engine import models, packed_attention
from advantage.engine.models import completion_logprobs, completion_values
from advantage.engine.packed_attention import segment_attention
from advantage.engine.packing import _first_fit, bucket, pack, packable
from advantage.engine.rollout import Rollout, pad_completions, pad_prompts
from advantage.engine.rollout.kv_cache import sdpa_gqa
from advantage.tasks import builtin_model_path


def rollout(prompts: list[list[int]], G: int, completions: list[list[int]]) -> Rollout:
    ids, mask = pad_prompts(prompts, pad_id=0)
    c_ids, c_mask, _ = pad_completions(completions, pad_id=0)
    return Rollout(
        prompt_ids=ids.repeat_interleave(G, 0),
        prompt_mask=mask.repeat_interleave(G, 0),
        completion_ids=c_ids,
        completion_mask=c_mask,
        truncated=torch.zeros(len(completions), dtype=torch.bool),
    )


def test_layout_of_one_group_by_hand():
    # prompt [7 8] (left-padded to 3 by the other group), completions [1 2 3] and [4]
    batch = rollout([[7, 8], [5, 6, 9]], 2, [[1, 2, 3], [4], [1], [2, 3]])
    packed = pack(batch, pad_id=0)
    # segments: [7 8 1 2] (completion [4] has no input token) and [5 6 9 | 2]; rows of 4
    assert packed.input_ids.tolist() == [[7, 8, 1, 2], [5, 6, 9, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    # row 0: completion [1 2 3] attends to the prompt and itself
    assert packed.allowed[0, 0].int().tolist() == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]
    # token 0 of every completion is predicted at the prompt's last position (column 1; row 1:
    # column 2), token j at the completion's input j - 1
    rows, cols = packed.entry_rows.tolist(), packed.entry_columns.tolist()
    assert list(zip(rows, cols, strict=True)) == [
        (0, 1), (0, 2), (0, 3),  # completion [1 2 3]
        (0, 1),                  # completion [4]
        (1, 2),                  # completion [1]
        (1, 2), (1, 3),          # completion [2 3]
    ]  # fmt: skip


def test_two_completions_of_a_prompt_do_not_see_each_other():
    batch = rollout([[7, 8]], 2, [[1, 2, 3], [4, 5]])
    packed = pack(batch, pad_id=0)
    assert packed.input_ids.tolist() == [[7, 8, 1, 2, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert packed.allowed[0, 0, 4].int().tolist() == [1, 1, 0, 0, 1]  # 4: the prompt and itself


def test_short_segments_share_a_row_and_pads_see_only_pads():
    placement, N = _first_fit([5, 2, 3, 4], bucketed=False)
    assert N == 5 and placement == [(0, 0), (2, 3), (2, 0), (1, 0)]  # rows: 5 | 4 | 3 + 2
    batch = rollout([[7, 8, 9], [5], [6]], 1, [[1, 2, 3], [4], [3, 3]])
    packed = pack(batch, pad_id=0)
    assert packed.input_ids.tolist() == [[7, 8, 9, 1, 2], [6, 3, 5, 0, 0]]
    assert packed.allowed[1, 0, 2].int().tolist() == [0, 0, 1, 0, 0]  # prompt [5]: itself
    assert packed.allowed[1, 0, 4].int().tolist() == [0, 0, 0, 1, 1]  # a pad: pads before it


def test_bucketed_rows_are_longer_and_give_the_same_logprobs():
    # 1/8 of the power of two at or below n, at least 8: at most 7 or 12.5% more positions
    assert [bucket(n) for n in (1, 8, 9, 130, 256, 257, 1000, 2200)] == [
        8, 8, 16, 144, 256, 288, 1024, 2304,
    ]  # fmt: skip
    assert all(n <= bucket(n) <= max(n + 7, 1.125 * n) for n in range(1, 5000))
    batch = varied_batch()
    plain, bucketed = pack(batch, pad_id=0), pack(batch, pad_id=0, bucketed=True)
    assert bucketed.input_ids.shape[1] == bucket(plain.input_ids.shape[1])
    assert (bucketed.entry_columns == plain.entry_columns).all()
    model = models.load_causal_lm(str(builtin_model_path("tiny-random")))
    with torch.no_grad():
        out = [
            p.entries(
                model(
                    input_ids=p.input_ids,
                    attention_mask=p.allowed,
                    position_ids=p.position_ids,
                    logits_to_keep=p.columns,
                ).logits
            )
            for p in (plain, bucketed)
        ]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared_rows", [False, True])
def test_segment_attention_equals_the_masked_call(shared_rows):
    """Outputs and gradients of segment_attention (SDPA per prompt and per completion) equal
    the masked SDPA call over the whole row at every position of a segment; pads get zeros."""
    batch = (
        rollout([[7, 8, 9], [5], [6]], 1, [[1, 2, 3], [4], [3, 3]])  # rows of two segments
        if shared_rows
        else varied_batch()  # 1-token completions (no inputs), environment tokens
    )
    packed = pack(batch, pad_id=0)
    R, N = packed.input_ids.shape
    assert len({s.row for s in packed.segments}) < len(packed.segments) or not shared_rows
    g = torch.Generator().manual_seed(0)
    q = torch.randn(R, 4, N, 8, generator=g).requires_grad_()
    k, v = (torch.randn(R, 2, N, 8, generator=g).requires_grad_() for _ in range(2))
    used = torch.zeros(R, N, dtype=torch.bool)  # positions inside a segment
    for s in packed.segments:
        used[s.row, s.offset : s.offset + s.prompt_len + sum(s.inputs)] = True
    assert not used.all() or not shared_rows  # some pads
    module = torch.nn.Module()
    outs, grads = [], []
    for kw in ({"packed_segments": packed.segments}, {}):
        out, _ = segment_attention(module, q, k, v, packed.allowed, scaling=0.3, **kw)
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        (out * weights)[used].sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    masked, _ = sdpa_gqa(module, q, k, v, packed.allowed, scaling=0.3)
    torch.testing.assert_close(outs[1], masked.detach())  # without segments: the masked call
    torch.testing.assert_close(outs[0][used], outs[1][used], rtol=0, atol=1e-6)
    assert (outs[0][~used] == 0).all()
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_packable_needs_a_4d_mask_attention_and_full_attention_layers():
    batch = rollout([[7, 8]], 1, [[1]])
    config = type("C", (), {"_attn_implementation": "sdpa", "layer_types": ["full_attention"]})
    assert packable(config, batch)
    config._attn_implementation = "flash_attention_2"
    assert not packable(config, batch)
    config._attn_implementation, config.layer_types = "sdpa", ["sliding_attention"]
    assert not packable(config, batch)


def varied_batch() -> Rollout:
    """Two groups of 3 (prompts of 5 and 2 tokens) and a lone prompt; completions of 1 to 6
    tokens; the last group multi-turn: environment tokens (action mask False) inside."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(4, 60, (n,), generator=g).tolist()

    prompts = [ids(5), ids(2), ids(4)]
    lengths = [6, 1, 4, 3, 5, 2, 6]
    batch = Rollout.concat(
        [
            rollout(prompts[:2], 3, [ids(n) for n in lengths[:6]]),
            rollout([prompts[2]], 1, [ids(6)]),
        ],
        pad_id=0,
    )
    batch.action_mask = batch.completion_mask.clone()
    batch.action_mask[3:6, 1:3] = False  # an environment reply inside the completion
    return batch


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def policy(request):
    model = models.load_causal_lm(str(builtin_model_path("tiny-random")))
    model.config._attn_implementation = request.param
    return model


def _both(monkeypatch, fn):
    """fn() packed, and on the padded rectangle with every prompt repeated (no sharing)."""
    packed = fn()
    original = models.completion_outputs
    monkeypatch.setattr(models, "packable", lambda config, batch: False)
    monkeypatch.setattr(models, "completion_outputs", lambda *a: original(*a, share_prompts=False))
    padded = fn()
    monkeypatch.undo()
    return packed, padded


def _loss_and_grads(model, fn):
    """A small loss of the per-token outputs (a weighted mean over the mask) and its gradient."""
    model.zero_grad()
    batch = varied_batch()
    out = fn(model, batch)
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    mask = batch.completion_mask
    (out * weights * mask).sum().div(mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_grads_equal(grads: dict, expected: dict) -> None:
    """Each parameter's gradient within 1e-6 of the other's, relative to its largest entry when
    that is above 1 (fp32 rounds a sum of 2 to ~2e-7)."""
    assert grads.keys() == expected.keys() and len(grads) > 10
    for name, g in grads.items():
        scale = max(1.0, expected[name].abs().max().item())
        assert (g - expected[name]).abs().max().item() <= 1e-6 * scale, name
    assert max(g.abs().max().item() for g in grads.values()) > 1e-3  # a real gradient


@pytest.fixture(params=["masked", "segments"])
def attention_kind(request):
    """The packed pass with the block mask, or with segment_attention (forced: these rows are
    too short for it to pay)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "segments":
            patch.setattr(packed_attention, "MIN_GAIN", 0)
        yield request.param


def test_packed_logprobs_entropy_and_gradients_equal_padded(policy, monkeypatch, attention_kind):
    batch = varied_batch()
    mask = batch.completion_mask
    (lp, ent), (lp_pad, ent_pad) = _both(
        monkeypatch, lambda: completion_logprobs(policy, batch, 0.7, with_entropy=True)
    )
    torch.testing.assert_close(lp[mask], lp_pad[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(ent[mask], ent_pad[mask], rtol=0, atol=1e-6)
    assert (lp[~mask] == 0).all() and (lp_pad[~mask] == 0).all()  # as the docstring says
    assert (ent[~mask] == 0).all() and (ent_pad[~mask] == 0).all()

    def lp_of(model, b):
        return completion_logprobs(model, b, 0.7)[0]

    (_, grads), (_, grads_pad) = _both(monkeypatch, lambda: _loss_and_grads(policy, lp_of))
    assert_grads_equal(grads, grads_pad)


def test_packed_values_and_gradients_equal_padded(monkeypatch, attention_kind):
    critic = models.load_critic(str(builtin_model_path("tiny-random")))
    # the zero-initialised head gives no signal
    torch.nn.init.normal_(critic.score.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    batch = varied_batch()
    mask = batch.completion_mask
    values, padded = _both(monkeypatch, lambda: completion_values(critic, batch))
    # values ~1: segment attention's products have other shapes than the rectangle's, and its
    # fp32 sums round differently (over 15 random heads: masked ≤ 7.2e-7, segments ≤ 1.4e-6)
    tolerance = 1e-6 if attention_kind == "masked" else 2e-6
    torch.testing.assert_close(values[mask], padded[mask], rtol=0, atol=tolerance)
    (_, grads), (_, grads_pad) = _both(
        monkeypatch, lambda: _loss_and_grads(critic, completion_values)
    )
    assert_grads_equal(grads, grads_pad)


def test_gradient_checkpointing_recomputes_the_same_attention(attention_kind):
    """With gradient checkpointing the backward pass runs each layer's forward again, outside
    the packed pass's context: the attention must be the same there (else the recompute
    saves other tensors: transformers' SDPA expands the K/V heads). The gradients equal those
    of the pass without checkpointing."""
    model = models.load_causal_lm(str(builtin_model_path("tiny-random")))
    model.config.attention_dropout = 0.0

    def lp_of(m, b):
        return completion_logprobs(m, b, 0.7)[0]

    model.train()
    _, expected = _loss_and_grads(model, lp_of)
    model.gradient_checkpointing_enable()
    assert models._checkpointing(model)
    _, grads = _loss_and_grads(model, lp_of)
    assert_grads_equal(grads, expected)


def test_segment_attention_in_bf16_with_widened_products(monkeypatch):
    """Under bf16 autocast with widened products the segments attend in fp32 on the
    bf16-rounded operands (output rounded to bf16), and the gradients come back rounded."""
    from advantage.engine import precision
    from advantage.tasks.tiny import tiny_qwen2

    monkeypatch.setattr(precision, "_choice", "fp32")
    packed = pack(varied_batch(), pad_id=0)
    R, N = packed.input_ids.shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(R, 4, N, 8, generator=g).requires_grad_()  # fp32, as rotary leaves it
    k, v = (torch.randn(R, 2, N, 8, generator=g).bfloat16().requires_grad_() for _ in range(2))
    module = torch.nn.Module()
    with precision.autocast("bf16", "cpu", tiny_qwen2("micro")):
        out, _ = segment_attention(module, q, k, v, None, packed_segments=packed.segments)
    out.float().square().sum().backward()
    wide = [t.detach().bfloat16().float() for t in (q, k, v)]
    expected, _ = segment_attention(module, *wide, None, packed_segments=packed.segments)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)
    assert k.grad.dtype == torch.bfloat16 and torch.equal(q.grad, q.grad.bfloat16().float())
