"""The decoder (skymoe_jax/model/attention.py, layers.py, transformer.py, spec.py): attention
against a numpy reference, GQA as MHA with repeated K/V heads, document masking, causality,
layer layout and per-MoE-layer statistics, dense and bfloat16 configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from skymoe_jax.config import base_config
from skymoe_jax.model.attention import Attention
from skymoe_jax.model.layers import rotary
from skymoe_jax.model.mesh_layout import MeshLayout
from skymoe_jax.model.moe.block import MoEBlock
from skymoe_jax.model.spec import ModelSpec
from skymoe_jax.model.transformer import build_model

V, D, H, KV, E, K = 32, 16, 4, 2, 4, 2
S = 8


def _config(**overrides):
    c = base_config()
    c.model.update(vocab_size=V, d_model=D, num_heads=H, num_kv_heads=KV, num_layers=2, ffn_dim=32)
    c.moe.update(num_experts=E, top_k=K, expert_ffn_dim=8, group_size=0)
    c.data.seq_len = S
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def _spec(**overrides) -> ModelSpec:
    return ModelSpec.from_config(_config(**overrides))


def _materialize(ctor, seed=0):
    """Build a module with numpy-drawn parameters: jax.random would compile an RNG program per
    shape (about a second each on this CPU). Scales keep activations O(1), so a masking or
    routing mistake shows as an O(1) change, not one hidden under the tolerance."""
    graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = path[-2].key  # the last path entry is the Variable's value
        noise = rng.normal(size=a.shape)
        value = 1.0 + 0.1 * noise if name == "scale" else (1.0 if name == "table" else 0.3) * noise
        return value.astype(a.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, abstract))


def _model(spec, seed=0):
    return _materialize(lambda: build_model(spec), seed)


def _tokens(seed=0, shape=(2, S)):
    return np.random.default_rng(seed).integers(0, V, size=shape).astype(np.int32)


def _np_rotary(x, positions, theta):
    """Rotate-half RoPE as in Llama / Hugging Face: x * cos + rotate_half(x) * sin."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    angle = positions[..., None, None] * inv_freq  # [B, S, 1, hd/2]
    cos, sin = np.concatenate([np.cos(angle)] * 2, -1), np.concatenate([np.sin(angle)] * 2, -1)
    rotated = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rotated * sin


def test_rotary_matches_numpy_reference_on_packed_positions():
    """The default model's shapes (16 x 256 tokens, 4 heads of 32), documents packed with positions restarting
    at 0. The float32 angle of position 255 is off by up to ~2e-5 rad (rounding of the frequency), which moves
    entries of |x| < 5 by under 1e-4."""
    rng = np.random.default_rng(0)
    b, s, h, hd = 16, 256, 4, 32
    starts = np.zeros((b, s), bool)
    starts[:, 0] = True
    starts |= rng.random((b, s)) < 0.02
    index = np.broadcast_to(np.arange(s), (b, s))
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    x = rng.normal(size=(b, s, h, hd)).astype(np.float32)
    got = rotary(jnp.asarray(x), jnp.asarray(positions, jnp.int32), 10_000.0)
    np.testing.assert_allclose(got, _np_rotary(x.astype(np.float64), positions, 10_000.0), atol=2e-4)


def test_rotary_position_outside_the_sequence_is_nan_not_a_wrong_rotation():
    x = jnp.ones((1, 4, 1, 8))
    got = np.asarray(rotary(x, jnp.asarray([[0, 1, 4, -1]], jnp.int32), 10_000.0))
    assert np.isfinite(got[0, :2]).all() and np.isnan(got[0, 2:]).all()


def _np_rms(x, scale, dims, eps):
    """RMSNorm of x over its last `dims` dimensions, times scale."""
    axes = tuple(range(-dims, 0))
    return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps) * np.asarray(scale[...], np.float64)


def _np_attention(attn, x, positions, segments, theta, qk_norm=None):
    """qk_norm: the attention's own (None) or another, to compute the same weights without their QK-norm."""
    qk_norm = attn.qk_norm if qk_norm is None else qk_norm
    wq, wk, wv, wo = (np.asarray(w[...], np.float64) for w in (attn.wq, attn.wk, attn.wv, attn.wo))
    q, k = np.einsum("bsd,dhk->bshk", x, wq), np.einsum("bsd,dhk->bshk", x, wk)
    if qk_norm != "none":  # per head over head_dim (Qwen3), or over all heads at once (OLMoE)
        dims = 1 if qk_norm == "head" else 2
        q, k = (
            _np_rms(q, attn.q_norm.scale, dims, attn.q_norm.eps),
            _np_rms(k, attn.k_norm.scale, dims, attn.k_norm.eps),
        )
    q, k = _np_rotary(q, positions, theta), _np_rotary(k, positions, theta)
    v = np.einsum("bsd,dhk->bshk", x, wv)
    group = q.shape[2] // k.shape[2]  # query head h reads key/value head h // group
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    s = x.shape[1]
    allowed = (np.arange(s)[None, :] <= np.arange(s)[:, None]) & (segments[:, :, None] == segments[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bqhk,hkd->bqd", np.einsum("bhqs,bshk->bqhk", p, v), wo)


# Two packed documents in row 0 (lengths 3 and 5, positions restarting at 0), one in row 1.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1] * S])
POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 3, 4], list(range(S))])


def _x(seed=1):
    return np.random.default_rng(seed).normal(size=(2, S, D)).astype(np.float32)


@pytest.mark.parametrize("impl", ["xla", "blocked", "chunked"])
def test_attention_matches_numpy_reference(impl):
    spec = _spec(model__attention_impl=impl)
    attn = _materialize(lambda: Attention(spec, nnx.Rngs(params=0), "gshard"))
    x = _x()
    got = attn(x, POSITIONS, SEGMENTS)
    # float32 vs float64 on O(1) activations: a few 1e-7; a wrong mask, rotation or head grouping moves O(0.1).
    np.testing.assert_allclose(
        got, _np_attention(attn, x.astype(np.float64), POSITIONS, SEGMENTS, spec.rope_theta), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("qk_norm", ["head", "full"])
def test_qk_norm_matches_numpy_reference(qk_norm):
    spec = _spec(model__attention_impl="xla", model__qk_norm=qk_norm)
    attn = _materialize(lambda: Attention(spec, nnx.Rngs(params=0), "gshard"))
    assert attn.q_norm.scale.shape == ((H, D // H) if qk_norm == "full" else (D // H,))
    x = _x()
    got = attn(x, POSITIONS, SEGMENTS)
    want = _np_attention(attn, x.astype(np.float64), POSITIONS, SEGMENTS, spec.rope_theta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # as the plain attention above
    # The norms act: the same weights without them give another output.
    plain = _np_attention(attn, x.astype(np.float64), POSITIONS, SEGMENTS, spec.rope_theta, qk_norm="none")
    assert np.max(np.abs(want - plain)) > 0.1


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = _materialize(lambda: Attention(_spec(), nnx.Rngs(params=0), "gshard"))
    mha = _materialize(lambda: Attention(_spec(model__num_kv_heads=H), nnx.Rngs(params=0), "gshard"), seed=1)
    mha.wq[...], mha.wo[...] = gqa.wq[...], gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], H // KV, axis=1)
    mha.wv[...] = jnp.repeat(gqa.wv[...], H // KV, axis=1)
    x = _x()
    # The same float32 products in both; only the summation grouping can differ.
    np.testing.assert_allclose(gqa(x, POSITIONS, SEGMENTS), mha(x, POSITIONS, SEGMENTS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "variant",
    [
        dict(moe__capacity_factor=E / K),  # every expert has room for the whole group: nothing drops
        dict(moe__num_experts=0),
    ],
)
def test_packed_document_equals_document_alone(variant):
    tokens = _tokens(2, shape=(1, S))
    packed = _model(_spec(**variant))
    # The lone document is a 5-token sequence, so its routing groups are 5 tokens long.
    alone = _model(_spec(data__seq_len=5, **variant))
    got = packed(tokens, POSITIONS[:1], SEGMENTS[:1]).logits[0, 3:]
    want = alone(tokens[:, 3:]).logits[0]
    # Masked scores get exactly zero attention weight; only float32 summation order differs.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Without document boundaries the first document does leak in: the check above has teeth.
    unmasked = packed(tokens, POSITIONS[:1]).logits[0, 3:]
    assert np.max(np.abs(unmasked - want)) > 1e-2


def test_future_tokens_do_not_change_earlier_logits():
    # Tight capacity with the position policy: drops happen, and they depend only on earlier tokens.
    model = _model(_spec(moe__capacity_factor=1.0, moe__drop_policy="position"))
    tokens = _tokens(3)
    changed = tokens.copy()
    changed[:, 5] = (changed[:, 5] + 1) % V
    before, after = model(tokens, train=True), model(changed, train=True)
    assert np.max(before.moe["drop_rate"]) > 0
    np.testing.assert_allclose(before.logits[:, :5], after.logits[:, :5], rtol=0, atol=1e-6)
    assert np.max(np.abs(before.logits[:, 5] - after.logits[:, 5])) > 1e-2


@pytest.mark.parametrize(
    "num_layers, first_k_dense, moe_every, stacks, moe_indices",
    [
        (6, 2, 2, (((False,), 2), ((False, True), 2)), [3, 5]),
        (4, 0, 1, (((True,), 4),), [0, 1, 2, 3]),
        (6, 0, 3, (((False, False, True), 2),), [2, 5]),
        (5, 1, 2, (((False,), 1), ((False, True), 2)), [2, 4]),
    ],
)
def test_layer_layout(num_layers, first_k_dense, moe_every, stacks, moe_indices):
    spec = _spec(model__num_layers=num_layers, moe__first_k_dense=first_k_dense, moe__moe_every=moe_every)
    assert spec.stacks() == stacks
    assert [i for i, is_moe in enumerate(spec.moe_layers) if is_moe] == moe_indices
    assert len(spec.moe_layers) == num_layers and spec.num_moe_layers == len(moe_indices)


def test_dense_layout_and_empty_moe_stats():
    spec = _spec(moe__num_experts=0, model__num_layers=3)
    assert spec.stacks() == (((False,), 3),) and spec.num_moe_layers == 0
    out = _model(spec)(_tokens())
    assert out.logits.shape == (2, S, V) and out.moe == {}


@pytest.mark.parametrize("scan", [True, False])
def test_moe_stats_are_per_layer_in_layer_order(scan):
    # 6 layers, 2 dense then (dense, MoE) x 2: MoE layers 3 and 5, in two stacks (scanned or unrolled), remat.
    spec = _spec(
        model__num_layers=6,
        moe__first_k_dense=2,
        moe__moe_every=2,
        moe__capacity_factor=1.0,
        model__remat="full",
        model__scan_layers=scan,
    )
    model = _model(spec)
    tokens = _tokens(4)
    out = model(tokens, train=True)
    assert out.moe["expert_load"].shape == (2, E)
    assert out.moe["mean_probs"].shape == (2, E)
    assert all(out.moe[name].shape == (2,) for name in ("z_loss", "drop_rate", "max1_max2"))

    # The same layers applied one by one, unstacked by hand, give the logits and the stats rows in order.
    positions = jnp.broadcast_to(jnp.arange(S), tokens.shape)
    segments = jnp.ones_like(tokens)
    x = model.embed(tokens)
    per_layer = []
    for stack in model.stacks:
        graphdef, state = nnx.split(stack.blocks)
        for r in range(jax.tree.leaves(state)[0].shape[0]):
            for layer in nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state)).layers:
                x, stats = layer(x, positions, segments, train=True)
                if stats is not None:
                    per_layer.append(stats)
    # The stack and the hand loop run the same float32 ops; only XLA's fusion and summation order differ.
    np.testing.assert_allclose(out.logits, model.head(model.final_norm(x)), rtol=1e-5, atol=1e-5)
    for name, rows in out.moe.items():
        np.testing.assert_allclose(rows, np.stack([s[name] for s in per_layer]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(per_layer[0]["z_loss"], per_layer[1]["z_loss"])  # the rows are distinguishable


def test_bfloat16_router_stays_float32():
    # Same parameters (float32) and the same bfloat16-representable input: if the gate matmul ran
    # in bfloat16 (8-bit mantissa) the logits would move by ~1e-2 and so would the z-loss.
    x = jnp.asarray(_x(), jnp.bfloat16)
    b16 = _materialize(lambda: MoEBlock(_spec(model__dtype="bfloat16"), nnx.Rngs(params=0), "gshard"))
    f32 = _materialize(lambda: MoEBlock(_spec(), nnx.Rngs(params=0), "gshard"))
    y, stats16 = b16(x, train=True)
    _, stats32 = f32(x.astype(jnp.float32), train=True)
    assert y.dtype == jnp.bfloat16
    for name in ("z_loss", "mean_probs", "max1_max2", "router_entropy", "expert_load", "drop_rate"):
        assert stats16[name].dtype == jnp.float32, name
        np.testing.assert_allclose(stats16[name], stats32[name], rtol=1e-6, err_msg=name)


def test_bfloat16_model_runs_close_to_float32():
    tokens = _tokens(5)
    out16 = _model(_spec(model__dtype="bfloat16"))(tokens, train=True)
    out32 = _model(_spec())(tokens, train=True)
    assert out16.logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16.logits)))
    assert all(v.dtype == jnp.float32 for v in out16.moe.values())
    # bfloat16 keeps ~3 significant digits per op: the typical logit moves ~0.2% of the logit scale
    # (measured over seeds). The max is no measure: a token whose 2nd and 3rd experts are nearly
    # tied can switch expert and jump by O(1), so compare the median.
    scale = float(jnp.max(jnp.abs(out32.logits)))
    assert np.median(np.abs(out16.logits - out32.logits)) < 0.01 * scale


def test_the_spec_reads_every_model_field_of_the_config():
    """ModelSpec.from_config takes the model and moe sections by field name: a new config field the model needs
    is declared on ModelSpec once; the training-only ones are named here."""
    c = base_config()
    names = {f.name for f in dataclasses.fields(ModelSpec)}
    unread = {f"{section}.{name}" for section in ("model", "moe") for name in c[section] if name not in names}
    # The loss's (training/step.py; moe.aux_loss is the layer's too, for the sequence-wise loss) and the balancing
    # bias's (training/balance_bias.py: the model takes the bias as an input, not as a setting).
    assert unread == {"moe.z_loss_coef", "moe.balance", "moe.bias_update_rate"}
    c.model.rope_theta = 500000  # an int where the spec declares a float
    assert isinstance(ModelSpec.from_config(c).rope_theta, float)


def test_mesh_facts_stay_out_of_the_model_spec():
    """The same model on another mesh has the same ModelSpec; the mesh's part (MoE layout, pipeline split)
    is the MeshLayout, which stores the (1, 3) split as stages of 3 slots: layer 0 at slot 0, layers 1-3 at
    slots 3-5."""
    one = base_config()
    split = base_config()
    split.parallel.update(mesh=(2, 4, 1), layout="edp", pipeline_stage_layers=(1, 3))
    assert ModelSpec.from_config(one) == ModelSpec.from_config(split)
    layout = MeshLayout.from_config(split)
    assert (layout.layout, layout.pipelined, layout.stored_layers(4)) == ("edp", True, 6)
    assert layout.layer_slots(4).tolist() == [0, 3, 4, 5]
    assert layout.layer_places(ModelSpec.from_config(split)) == ((0, 0, 0), (0, 0, 3), (0, 0, 4), (0, 0, 5))
    assert MeshLayout.from_config(one).layer_slots(4).tolist() == [0, 1, 2, 3]
