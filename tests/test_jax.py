"""The JAX / Flax backend: parity with the torch reference (stored vectors, property tests, real
model blocks), jit, typed errors, lazy imports."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dynamic_moe_router as dmr
from dynamic_moe_router import core as spec
from dynamic_moe_router.policies import policy_from_dict
from strategies import policies_for

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nnx = pytest.importorskip("flax.nnx")
djax = pytest.importorskip("dynamic_moe_router.jax")

ROOT = Path(__file__).resolve().parents[1]
VECTORS = Path(__file__).parent / "vectors"
ROUTING = np.load(VECTORS / "routing.npz")
MANIFEST = json.loads(str(ROUTING["manifest"]))


def jax_case(i: int) -> tuple[dict, dict[str, np.ndarray]]:
    return MANIFEST[i], {
        n: ROUTING[f"{i}/{n}"] for n in ("scores", "probs", "gate", "ids", "weights", "counts")
    }


def jax_route(meta: dict, a: dict[str, np.ndarray], **extra):  # type: ignore[no-untyped-def]
    return djax.route(
        jnp.asarray(a["scores"]),
        policy_from_dict(meta["policy"]),
        native_k=meta["native_k"],
        probs=jnp.asarray(a["probs"]),
        gate=jnp.asarray(a["gate"]),
        normalize=meta["normalize"],
        scaling=meta["scaling"],
        layer=meta["layer"],
        **extra,
    )


# -- stored vectors ----------------------------------------------------------------------------------
def test_jax_reproduces_every_routing_vector():  # type: ignore[no-untyped-def]
    for i in range(len(MANIFEST)):
        meta, a = jax_case(i)
        r = jax_route(meta, a)
        assert r.ids.dtype == jnp.int32 and r.counts.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(r.ids), a["ids"], err_msg=f"case {i}: {meta}")
        np.testing.assert_array_equal(np.asarray(r.counts), a["counts"], err_msg=f"case {i}")
        np.testing.assert_allclose(
            np.asarray(r.weights), a["weights"], rtol=0, atol=1e-6, err_msg=f"case {i}"
        )


@pytest.mark.parametrize("i", [8, 38, 51, 75, 101, 119])
def test_jit_matches_eager_and_vectors(i):  # type: ignore[no-untyped-def]
    meta, a = jax_case(i)
    policy = policy_from_dict(meta["policy"])

    @jax.jit
    def routed(scores, probs, gate):  # type: ignore[no-untyped-def]
        return djax.route(
            scores,
            policy,
            native_k=meta["native_k"],
            probs=probs,
            gate=gate,
            normalize=meta["normalize"],
            scaling=meta["scaling"],
            layer=meta["layer"],
            validate=False,
        )

    r = routed(jnp.asarray(a["scores"]), jnp.asarray(a["probs"]), jnp.asarray(a["gate"]))
    assert isinstance(r, djax.Routing) and r.num_experts == a["scores"].shape[1]
    np.testing.assert_array_equal(np.asarray(r.ids), a["ids"])
    np.testing.assert_allclose(np.asarray(r.weights), a["weights"], rtol=0, atol=1e-6)
    assert r.kept_pairs() == int(a["counts"].sum()) and r.k_max == a["ids"].shape[1]


def test_layer_vector_dynamic_moe_matches_torch():  # type: ignore[no-untyped-def]
    z = np.load(VECTORS / "layer.npz")
    experts, two_i, hidden_size = z["gate_up"].shape
    policy = policy_from_dict(json.loads(str(z["policy"])))
    outs = {}
    for impl in ("blocked", "ragged_dot"):
        moe = djax.DynamicMoE(
            hidden_size,
            two_i // 2,
            experts,
            native_k=int(z["native_k"]),
            policy=policy,
            impl=impl,
            rngs=nnx.Rngs(0),
        )
        moe.router[...] = jnp.asarray(z["router"])
        moe.gate_up[...] = jnp.asarray(z["gate_up"])
        moe.down[...] = jnp.asarray(z["down"])
        out, r = nnx.jit(lambda m, x: m(x, return_routing=True))(moe, jnp.asarray(z["hidden"]))
        np.testing.assert_array_equal(np.asarray(r.ids), z["ids"])
        np.testing.assert_allclose(np.asarray(r.weights), z["weights"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out), z["out"], rtol=0, atol=1e-5)
        outs[impl] = np.asarray(out)
    zero = z["counts"] == 0
    assert zero.any() and (outs["blocked"][zero] == 0).all()  # tokens with no kept expert: exactly 0
    assert not (z["ids"] == 7).any()  # expert 7 has no token: an empty group


# -- moe_forward ------------------------------------------------------------------------------------
def _random_layer(seed: int, tokens: int, experts: int, k: int, hidden: int = 16, inter: int = 8):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.3
    down = torch.randn(experts, hidden, inter, generator=g) * 0.3
    probs = torch.softmax(torch.randn(tokens, experts, generator=g) * 2, -1)
    r = dmr.route(probs, dmr.TopP(p=0.5, min_k=0, max_k=k), native_k=min(k, experts), normalize="sum")
    module = torch.nn.Module()
    module.gate_up_proj, module.down_proj = torch.nn.Parameter(gate_up), torch.nn.Parameter(down)
    module.act_fn = torch.nn.SiLU()
    ref = dmr.experts_forward(module, x, r.ids, r.weights, backend="loop").detach()
    as_jax = [jnp.asarray(t.numpy()) for t in (x, r.ids.to(torch.int32), r.weights, gate_up, down)]
    return as_jax, ref.numpy(), r.kept_pairs()


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_moe_forward_matches_torch_full_and_compacted(impl):  # type: ignore[no-untyped-def]
    (x, ids, w, gate_up, down), ref, kept = _random_layer(1, tokens=40, experts=6, k=3)
    fwd = jax.jit(djax.moe_forward, static_argnames=("impl", "rows", "block"))
    full = fwd(x, ids, w, gate_up, down, impl=impl, block=4)
    compact = fwd(x, ids, w, gate_up, down, impl=impl, rows=kept, block=4)
    np.testing.assert_allclose(np.asarray(full), ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(compact), ref, rtol=0, atol=1e-5)


def test_moe_forward_nothing_kept_and_bad_inputs():  # type: ignore[no-untyped-def]
    (x, ids, w, gate_up, down), _, _ = _random_layer(2, tokens=5, experts=4, k=2)
    sentinel = jnp.full_like(ids, 4)
    fwd = jax.jit(djax.moe_forward, static_argnames="impl")
    for impl in ("blocked", "ragged_dot"):
        out = fwd(x, sentinel, jnp.zeros_like(w), gate_up, down, impl=impl)
        assert (np.asarray(out) == 0).all()
    with pytest.raises(dmr.RoutingInputError, match="expects hidden"):
        djax.moe_forward(x[:3], ids, w, gate_up, down)
    with pytest.raises(dmr.RoutingInputError, match="do not fit"):
        djax.moe_forward(x[:, :8], ids, w, gate_up, down)
    with pytest.raises(dmr.RoutingInputError, match="rows must be"):
        djax.moe_forward(x, ids, w, gate_up, down, rows=1000)
    with pytest.raises(dmr.BackendUnavailableError, match="unknown moe_forward impl"):
        djax.moe_forward(x, ids, w, gate_up, down, impl="cuda")


# -- property tests against the torch reference ---------------------------------------------------
def _near_threshold(policy: dmr.RoutingPolicy, probs: torch.Tensor, native_k: int) -> torch.Tensor:  # (T,)
    """Tokens whose count hinges on a comparison within float32 rounding (summation order may differ)."""
    k_min, k_max = policy.k_range(native_k, probs.shape[1])
    p64 = probs.double()
    if isinstance(policy, dmr.TopP):
        ranked = torch.sort(p64, -1, descending=True).values[:, :k_max]
        before = torch.cumsum(ranked, -1) - ranked
        return ((before - policy.p).abs() < 1e-5).any(-1)
    if isinstance(policy, dmr.EntropyAdaptive) and probs.shape[1] > 1:
        h = -torch.special.xlogy(p64, p64).sum(-1) / math.log(probs.shape[1])
        x = (h - policy.low) / (policy.high - policy.low) * (k_max - k_min + 1)
        return (
            ((x - x.round()).abs() < 1e-4)
            | ((h - policy.low).abs() < 1e-5)
            | ((h - policy.high).abs() < 1e-5)
        )
    return torch.zeros(probs.shape[0], dtype=torch.bool)


@st.composite
def few_shape_problems(draw):  # type: ignore[no-untyped-def]
    """Like ``strategies.routing_problems`` with few distinct shapes: eager JAX compiles per shape."""
    num_experts = draw(st.sampled_from([1, 6, 16]))
    native_k = draw(st.integers(1, min(4, num_experts)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    temperature = draw(st.sampled_from([0.1, 0.5, 1.0, 3.0, 10.0]))
    logits = torch.randn(9, num_experts, generator=gen, dtype=torch.float64).float() * temperature
    return torch.softmax(logits, dim=-1), native_k


@settings(max_examples=20)
@given(data=st.data(), problem=few_shape_problems(), normalize=st.sampled_from(["none", "sum", "softmax"]))
def test_jax_route_agrees_with_torch_route(data, problem, normalize):  # type: ignore[no-untyped-def]
    probs, native_k = problem
    policy = data.draw(policies_for(probs.shape[1], native_k))
    gate = torch.log(probs + 1e-9) if normalize == "softmax" else probs
    kwargs = {"native_k": native_k, "gate": gate, "normalize": normalize}
    ref = spec.route(spec.TorchOps(stable_ties=True), probs, policy, **kwargs)  # cross-framework tie rule
    lib = dmr.route(probs, policy, **kwargs)
    r = djax.route(jnp.asarray(probs.numpy()), policy, **{**kwargs, "gate": jnp.asarray(gate.numpy())})
    ok = ~_near_threshold(policy, probs, native_k).numpy()
    assert torch.equal(lib.counts, ref.counts)  # torch.topk's tie order changes ids only
    np.testing.assert_array_equal(np.asarray(r.counts)[ok], ref.counts.numpy()[ok])
    np.testing.assert_array_equal(np.asarray(r.ids)[ok], ref.ids.numpy()[ok])
    np.testing.assert_allclose(np.asarray(r.weights)[ok], ref.weights.numpy()[ok], rtol=0, atol=1e-6)
    assert (np.asarray(r.ids)[np.asarray(r.weights) != 0] < probs.shape[1]).all()


# -- errors and jit rules ---------------------------------------------------------------------------
def test_validate_under_jit_raises_a_typed_error_and_validate_false_runs():  # type: ignore[no-untyped-def]
    probs = jnp.asarray(np.full((3, 4), 0.25, np.float32))
    with pytest.raises(dmr.RoutingInputError, match="pass validate=False"):
        jax.jit(lambda p: djax.route(p, dmr.TopP(), native_k=2).ids)(probs)
    ids = jax.jit(lambda p: djax.route(p, dmr.TopP(p=0.6), native_k=2, validate=False).ids)(probs)
    assert np.asarray(ids).tolist() == [[0, 1], [0, 1], [0, 1]]  # exact ties: the lower index first


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_raise(bad):  # type: ignore[no-untyped-def]
    p = np.full((4, 6), 1 / 6, np.float32)
    p[2, 3] = bad
    with pytest.raises(dmr.NonFiniteRouterScoresError, match="1 of 4 tokens") as info:
        djax.route(jnp.asarray(p), dmr.TopP(p=0.5), native_k=2, layer=5)
    assert info.value.layer == 5 and info.value.bad_tokens == 1 and "MoE layer 5" in str(info.value)
    excluded = p.copy()
    excluded[2, 3] = -np.inf
    r = djax.route(
        jnp.asarray(excluded), dmr.StaticTopK(k=6), native_k=2, probs=jnp.asarray(np.abs(p[[0, 0, 0, 0]]))
    )
    assert np.asarray(r.counts).tolist() == [6, 6, 5, 6]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": np.zeros(3, np.float32)}, "must be 2-D"),
        ({"scores": np.zeros((3, 4), np.int32)}, "floating-point"),
        ({"scores": [[0.1, 0.9]]}, "must be a jax.Array"),
        ({"probs": np.zeros((3, 5), np.float32)}, "must have the shape of scores"),
        ({"gate": np.zeros((2, 4), np.float32)}, "must have the shape of scores"),
        ({"native_k": 0}, "native_k must be an int in"),
        ({"native_k": 5}, "native_k must be an int in"),
        ({"normalize": "l2"}, "normalize must be"),
    ],
)
def test_bad_inputs_raise_routing_input_error(kwargs, match):  # type: ignore[no-untyped-def]
    args = {"scores": np.full((3, 4), 0.25, np.float32), "native_k": 2, **kwargs}
    scores = args.pop("scores")
    with pytest.raises(dmr.RoutingInputError, match=match):
        djax.route(scores, dmr.StaticTopK(), **args)


def test_policy_errors_and_torch_only_policies():  # type: ignore[no-untyped-def]
    probs = jnp.full((2, 4), 0.25)
    with pytest.raises(dmr.PolicyError, match="exceeds"):
        djax.route(probs, dmr.TopP(max_k=5), native_k=2)

    @dataclasses.dataclass(frozen=True)
    class TorchOnly(dmr.RoutingPolicy):
        def k_range(self, native_k, num_experts):  # type: ignore[no-untyped-def]
            return 1, 1

        def keep_counts(self, ranked_probs, probs, k_min, k_max):  # type: ignore[no-untyped-def]
            return torch.ones(ranked_probs.shape[0], dtype=torch.long)

    assert dmr.route(torch.full((2, 4), 0.25), TorchOnly(), native_k=2).counts.tolist() == [1, 1]
    with pytest.raises(dmr.PolicyError, match="implement keep_counts_ops"):
        djax.route(probs, TorchOnly(), native_k=2)


def test_zero_tokens():  # type: ignore[no-untyped-def]
    r = djax.route(jnp.zeros((0, 8)), dmr.EntropyAdaptive(), native_k=2)
    assert r.ids.shape == (0, 2) and r.counts.shape == (0,) and r.kept_pairs() == 0


def test_imports_are_lazy_and_missing_jax_is_a_typed_error():  # type: ignore[no-untyped-def]
    code = (
        "import sys, dynamic_moe_router as dmr\n"
        "assert 'jax' not in sys.modules and 'flax' not in sys.modules\n"
        "sys.modules['jax'] = None\n"
        "try:\n"
        "    import dynamic_moe_router.jax\n"
        "except dmr.MissingDependencyError as err:\n"
        "    assert 'pip install \"dynamic-moe-router-kit[jax]\"' in str(err), err\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok", out.stderr


# -- real weights: the reference models --------------------------------------------------------------
@pytest.mark.parametrize(("name", "layer"), [("ref-mixtral", 3), ("ref-olmoe", 2)])
@torch.no_grad()
def test_dynamic_moe_matches_the_patched_torch_block_on_real_weights(name, layer):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ROOT / "models" / name
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(
        "It was a bright cold day in April, and the clocks were striking thirteen.", return_tensors="pt"
    )
    block = model.model.layers[layer].mlp
    captured = {}
    block.register_forward_hook(lambda m, args, out: captured.update(x=args[0].clone(), y=out.clone()))
    policy = dmr.PerLayer(dmr.StaticTopK(), {layer: dmr.TopP(p=0.5, max_k=3)})
    dmr.patch(model, policy)
    model(ids.input_ids)
    dmr.unpatch(model)
    x, expected = captured["x"], captured["y"]  # (1, S, H): real hidden states, patched torch output
    moe = djax.DynamicMoE.from_transformers(block, policy, layer=layer)
    assert moe.renormalize == (name == "ref-mixtral")  # OLMoE: norm_topk_prob=False
    out, r = nnx.jit(lambda m, h: m(h, return_routing=True))(moe, jnp.asarray(x.numpy()))
    probs = torch.softmax(block.gate.weight @ x[0].T, 0).T
    ref = dmr.route(
        probs, policy, native_k=moe.native_k, normalize="sum" if moe.renormalize else "none", layer=layer
    )
    np.testing.assert_array_equal(np.asarray(r.ids), ref.ids.numpy())
    assert 0 < r.kept_pairs() < x.shape[1] * moe.native_k  # dynamic: fewer pairs than native top-k
    np.testing.assert_allclose(np.asarray(out), expected.numpy(), rtol=0, atol=1e-5)


def test_adapters_implement_the_ops_protocol_and_the_tie_rule():  # type: ignore[no-untyped-def]
    assert isinstance(djax.JAX_OPS, spec.Ops) and isinstance(spec.TORCH_OPS, spec.Ops)
    tied = np.array([[1.0, 3.0, 1.0, 3.0, 1.0, 3.0, 0.0, 1.0]], np.float32)
    expected = [[1, 3, 5, 0, 2]]  # descending, exact ties: the lower index first
    assert np.asarray(djax.JAX_OPS.top_k(jnp.asarray(tied), 5)[1]).tolist() == expected
    assert spec.TorchOps(stable_ties=True).top_k(torch.from_numpy(tied), 5)[1].tolist() == expected


def test_old_and_new_backend_argument_together_are_refused():  # type: ignore[no-untyped-def]
    x = jnp.zeros((2, 4))
    ids = jnp.array([[0, 1], [1, 2]])
    w = jnp.full((2, 2), 0.5)
    gate_up, down = jnp.zeros((2, 6, 4)), jnp.zeros((2, 4, 3))
    with pytest.raises(TypeError, match="both impl= and backend="):
        djax.moe_forward(x, ids, w, gate_up, down, impl="blocked", backend="ragged_dot")
