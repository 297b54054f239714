"""The framework-neutral core (issue 9): one patch lifecycle, one routing type, one backend table,
one weight rule, the deprecated names and the lazy package import."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router import backends, core
from dynamic_moe_router.core import TORCH_OPS
from dynamic_moe_router.hf.tiny import tiny_model

SRC = Path(__file__).resolve().parents[1] / "src" / "dynamic_moe_router"


# -- the patch lifecycle, on plain Python objects (no framework) -----------------------------------
@dataclass(frozen=True)
class Layer:
    index: int
    path: str
    num_experts: int = 8
    native_k: int = 2
    flops_per_pair: int = 6


class Block:
    def call(self, x):  # type: ignore[no-untyped-def]
        return x


class Counter:
    def __init__(self, n: int) -> None:
        self.executed_pairs = n

    def reset(self) -> None:
        self.executed_pairs = 0


class Handle(core.PatchHandleBase):
    handle_attr = "_test_handle"
    fail_at: int | None = None  # raise after this many blocks were patched

    def __init__(self, model, blocks, layers, policy):  # type: ignore[no-untyped-def]
        super().__init__(model, layers, policy, family="test")
        self.blocks = blocks
        self.seen: list[object] = []
        self._counters = [Counter(3), Counter(4)]

    def _install(self) -> None:
        for i, block in enumerate(self.blocks):
            if self.fail_at is not None and i == self.fail_at:
                raise RuntimeError("simulated failure")
            self._set(block, "call", lambda x, i=i: (i, x))

    def _policy_changed(self, policy):  # type: ignore[no-untyped-def]
        self.seen.append(policy)

    def counters(self):  # type: ignore[no-untyped-def]
        return self._counters


def _model():  # type: ignore[no-untyped-def]
    class Model:
        pass

    model = Model()
    blocks = [Block(), Block()]
    layers = [Layer(0, "layers.0.moe"), Layer(2, "layers.2.moe")]
    return model, blocks, layers


def test_apply_and_undo_restore_every_instance_attribute():  # type: ignore[no-untyped-def]
    model, blocks, layers = _model()
    blocks[1].call = "an instance attribute that was there before"  # type: ignore[method-assign]
    handle = Handle(model, blocks, layers, dmr.StaticTopK())
    handle._apply()
    assert handle.active and model._test_handle is handle
    assert blocks[0].call(5) == (0, 5) and blocks[1].call(5) == (1, 5)
    assert handle.executed_pairs() == 7
    handle.reset_counters()
    assert handle.executed_pairs() == 0
    handle.unpatch()
    assert not handle.active and not hasattr(model, "_test_handle")
    assert "call" not in blocks[0].__dict__ and blocks[0].call(5) == 5
    assert blocks[1].call == "an instance attribute that was there before"
    with pytest.raises(dmr.NotPatchedError, match="already undone"):
        handle.unpatch()


def test_a_failing_apply_changes_nothing():  # type: ignore[no-untyped-def]
    model, blocks, layers = _model()
    handle = Handle(model, blocks, layers, dmr.StaticTopK())
    handle.fail_at = 1  # the first block is patched, then the second fails
    with pytest.raises(RuntimeError, match="simulated failure"):
        handle._apply()
    assert not handle.active and not hasattr(model, "_test_handle")
    assert all("call" not in b.__dict__ for b in blocks)


def test_replace_restores_the_old_patch_when_the_new_one_fails():  # type: ignore[no-untyped-def]
    model, blocks, layers = _model()
    old = core.apply_replacing(Handle(model, blocks, layers, dmr.StaticTopK()), None)
    with pytest.raises(dmr.AlreadyPatchedError, match=r"call undo\(model\) first"):
        core.refuse_if_patched(old, False, unpatch_call="undo(model)")
    core.refuse_if_patched(old, True, unpatch_call="undo(model)")  # replace=True: no error
    new = Handle(model, blocks, layers, dmr.TopP(p=0.5))
    new.fail_at = 1
    with pytest.raises(RuntimeError):
        core.apply_replacing(new, old)
    assert old.active and model._test_handle is old and blocks[1].call(1) == (1, 1)
    assert not new.active


def test_set_policy_is_validated_for_every_layer_first():  # type: ignore[no-untyped-def]
    model, blocks, layers = _model()
    handle = core.apply_replacing(Handle(model, blocks, layers, dmr.StaticTopK()), None)
    with pytest.raises(dmr.PolicyError, match="no MoE block; the MoE layers are \\[0, 2\\]"):
        handle.set_policy(dmr.PerLayer(dmr.StaticTopK(), {1: dmr.TopP(p=0.5)}))
    with pytest.raises(dmr.PolicyError, match="MoE layer 0 \\(E=8, native k=2\\)"):
        handle.set_policy(dmr.StaticTopK(k=9))
    with pytest.raises(dmr.PolicyError, match="must be a RoutingPolicy"):
        handle.set_policy("top_p")
    assert handle.seen == [] and handle.policy == dmr.StaticTopK()
    handle.set_policy(dmr.TopP(p=0.5))
    assert handle.seen == [dmr.TopP(p=0.5)] and handle.policy == dmr.TopP(p=0.5)
    with core.undo_on_exit(handle):
        pass
    assert not handle.active
    with pytest.raises(dmr.NotPatchedError, match="already undone; patch the model again"):
        handle.set_policy(dmr.TopP(p=0.6))  # an undone handle changes nothing any more
    assert handle.seen == [dmr.TopP(p=0.5)] and handle.policy == dmr.TopP(p=0.5)
    with pytest.raises(dmr.NotPatchedError, match="Model is not patched"):
        core.require_handle(None, model)


def test_hf_and_keras_handles_share_the_lifecycle():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.patching import PatchHandle

    assert issubclass(PatchHandle, core.PatchHandleBase)
    source = (SRC / "keras" / "hub.py").read_text()
    assert "class KerasPatchHandle(core.PatchHandleBase)" in source
    for path in (SRC / "keras").glob("*.py"):  # no arrow from keras/ into hf/
        tree = ast.parse(path.read_text())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(m == "hf" or m.startswith("hf.") for m in modules), path.name


# -- one routing type, one finiteness check, one weight rule ------------------------------------------
def test_one_routing_type():  # type: ignore[no-untyped-def]
    r = dmr.route(torch.tensor([[0.6, 0.3, 0.1]]), dmr.TopP(p=0.5), native_k=2)
    assert type(r) is core.Routing and dmr.Routing is core.Routing
    assert r.kept_pairs() == 1 and r.sentinel == 3 and r.k_max == 2
    assert r.kept.tolist() == [[True, False]]


@pytest.mark.parametrize(
    ("row", "allow_neg_inf", "bad"),
    [
        ([0.1, float("nan"), 0.2], True, True),
        ([0.1, float("inf"), 0.2], True, True),
        ([0.1, float("-inf"), 0.2], True, False),
        ([0.1, float("-inf"), 0.2], False, True),
        ([0.1, 0.5, 0.2], False, False),
    ],
)
def test_check_finite(row, allow_neg_inf, bad):  # type: ignore[no-untyped-def]
    x = torch.tensor([[0.3, 0.3, 0.4], row, row])
    if bad:
        with pytest.raises(dmr.NonFiniteRouterScoresError, match="for 2 of 3 tokens") as err:
            core.check_finite(TORCH_OPS, "logits", x, 4, allow_neg_inf=allow_neg_inf)
        assert err.value.layer == 4 and err.value.bad_tokens == 2
    else:
        core.check_finite(TORCH_OPS, "logits", x, 4, allow_neg_inf=allow_neg_inf)


def test_weight_rule_is_shared():  # type: ignore[no-untyped-def]
    assert [core.renormalises(r, f) for r, f in [("always", False), ("never", True), ("config", 1)]] == [
        True,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="weight rule"):
        core.renormalises("sometimes")
    for module in ("hf/scoring.py", "keras/hub.py"):  # hf patching and inspect ask the scorer
        assert "core.renormalises(" in (SRC / module).read_text(), module


@pytest.mark.parametrize("norm", [True, False])
def test_inspect_names_this_checkpoints_weight_rule(norm):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.hf.inspect import inspect_model

    model = tiny_model("olmoe", norm_topk_prob=norm)
    info = inspect_model(model)
    kind = "renormalised" if norm else "raw"
    assert info["weights"] == f"{kind}: norm_topk_prob={norm} in this config"
    assert all(layer["renormalises"] is norm for layer in info["layers"])
    handle = dmr.patch(model)
    assert all(router.renormalize is norm for router in handle.routers)
    dmr.unpatch(model)


# -- policies: one counting method, no import loop ----------------------------------------------------
def test_policy_modules_have_no_import_loop():  # type: ignore[no-untyped-def]
    tree = ast.parse((SRC / "policies" / "_base.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "_io" not in imported and "_builtin" not in imported
    assert not (SRC / "core" / "_policies.py").exists()  # the math lives in each policy


def test_keep_counts_is_keep_counts_ops_on_torch():  # type: ignore[no-untyped-def]
    probs = torch.softmax(torch.randn(16, 8), dim=-1)
    ranked = probs.sort(dim=-1, descending=True).values[:, :4]
    for policy in (dmr.TopP(p=0.6), dmr.RelativeThreshold(beta=0.4), dmr.EntropyAdaptive(max_k=4)):
        counts = policy.keep_counts(ranked, probs, 1, 4)
        assert torch.equal(counts, policy.keep_counts_ops(TORCH_OPS, ranked, probs, 1, 4))
        assert counts.dtype == torch.long and int(counts.min()) >= 1 and int(counts.max()) <= 4


# -- the backend table ------------------------------------------------------------------------------------
def test_backend_table_drives_every_list():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.cli import CLI_BACKENDS
    from dynamic_moe_router.experts import BACKENDS

    assert BACKENDS == CLI_BACKENDS == backends.BACKENDS == backends.backend_names("torch")
    for entry in backends.BACKEND_TABLE:
        assert entry.name in backends.backends_markdown()
        if entry.framework == "torch" and entry.impl is not None:
            assert callable(entry.load()) and callable(entry.load_check())
    with pytest.raises(dmr.BackendUnavailableError, match="unknown experts backend 'fast'"):
        backends.get_backend("fast")
    with pytest.raises(dmr.BackendUnavailableError, match="has no kernel"):
        backends.get_backend("auto").load()


def test_backends_and_cli_parser_import_no_torch():  # type: ignore[no-untyped-def]
    code = (
        "import sys; import dynamic_moe_router.backends as b; "
        "from dynamic_moe_router.cli import CLI_BACKENDS; "
        "assert 'torch' not in sys.modules, 'torch imported'; print(','.join(CLI_BACKENDS))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "auto,loop,grouped,cuda,triton"


# -- the lazy package and the deprecated names ------------------------------------------------------------
def test_import_is_lazy_and_the_public_api_resolves():  # type: ignore[no-untyped-def]
    code = (
        "import sys; import dynamic_moe_router as dmr; "
        "assert 'torch' not in sys.modules and 'torch._dynamo' not in sys.modules, 'torch imported'; "
        "assert set(dmr.__all__) <= set(dir(dmr)); "
        "missing = [n for n in dmr.__all__ if getattr(dmr, n, None) is None]; "
        "print(len(dmr.__all__), missing)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{len(dmr.__all__)} []"


def test_spec_is_a_deprecated_alias_of_core(monkeypatch):  # type: ignore[no-untyped-def]
    # import it afresh even if this process imported it before (doctest collection does)
    monkeypatch.delitem(sys.modules, "dynamic_moe_router.spec", raising=False)
    monkeypatch.delitem(vars(dmr), "spec", raising=False)  # (getattr would import it lazily)
    with pytest.warns(DeprecationWarning, match="dynamic_moe_router.core"):
        spec = importlib.import_module("dynamic_moe_router.spec")
    assert spec.route is core.route and spec.Routed is core.Routing and spec.TORCH_OPS is TORCH_OPS
    ranked = torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    assert spec.top_p_counts(TORCH_OPS, ranked, 0.5, 1, 3).tolist() == [1, 2]
    assert spec.relative_threshold_counts(TORCH_OPS, ranked, 0.6, 1, 3).tolist() == [1, 3]
    assert spec.static_counts(TORCH_OPS, ranked, 2).tolist() == [2, 2]
    flat = torch.full((1, 4), 0.25)
    assert spec.entropy_counts(TORCH_OPS, flat, 0.0, 1.0, 1, 3).tolist() == [3]


def test_renamed_names_warn_and_still_work():  # type: ignore[no-untyped-def]
    handle = dmr.patch(tiny_model("mixtral"))
    layer = handle.layers[0]
    with pytest.warns(DeprecationWarning, match="MoELayer.path"):
        assert layer.name == layer.path
    with pytest.warns(DeprecationWarning, match="family_record"):
        assert handle.spec is handle.family_record
    assert handle.family == handle.family_record.model_type == "mixtral"
    handle.unpatch()
    from dynamic_moe_router._deprecation import renamed_argument

    @renamed_argument("impl", "backend")
    def run(*, backend: str = "auto") -> str:
        return backend

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(backend="loop") == "loop"
    with pytest.warns(DeprecationWarning, match=r"run\(impl=...\) is deprecated"):
        assert run(impl="loop") == "loop"
    with pytest.raises(TypeError, match="both impl= and backend="):
        run(impl="loop", backend="loop")


def test_spec_attribute_warns_at_the_caller(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delitem(sys.modules, "dynamic_moe_router.spec", raising=False)
    monkeypatch.delitem(vars(dmr), "spec", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dmr.spec.route is core.route
    deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(deprecations) == 1 and deprecations[0].filename == __file__
