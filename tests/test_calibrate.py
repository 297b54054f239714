"""Calibration: reaching a requested routed-FLOP reduction, typed errors, CLI round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dynamic_moe_router as dmr
from dynamic_moe_router.calibrate import KNOBS, calibrate
from dynamic_moe_router.cli import main
from dynamic_moe_router.hf.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair."
] * 8


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "models" / "ref-mixtral")


@pytest.mark.parametrize("family", list(KNOBS))
def test_reaches_the_requested_reduction(tokenizer, family):  # type: ignore[no-untyped-def]
    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    result = calibrate(model, tokenizer, 0.3, documents=DOCS, family=family, tokens=512, context=128)
    assert result.reduction >= 0.3 and result.family == family
    # the measurement is reproducible: the saved policy gives the same reduction
    with dmr.patched(model, result.policy), dmr.profile(model, count_dense=False) as report:
        from dynamic_moe_router.calibrate import calibration_windows

        windows = calibration_windows(tokenizer, DOCS, 512, 128)
        model(windows[:, :-1])
    assert report.to_dict()["routed_flop_reduction"] == pytest.approx(result.reduction)
    assert result.to_dict()["nll_increase"] == pytest.approx(result.nll - result.native_nll)
    global_only = [m for m in result.history if m.get("stage") == "global" and m["reduction"] >= 0.3]
    assert result.nll <= min(m["nll"] for m in global_only) + 1e-12  # per layer is kept only if better


def test_learned_family_trains_on_the_train_documents_and_reaches_the_target(tokenizer):  # type: ignore[no-untyped-def]
    long_docs = [" ".join(DOCS)] * 3
    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    training = dmr.AllocatorTraining(steps=30, batch_windows=2, offset_iterations=12)
    kwargs = {"documents": long_docs, "train_documents": long_docs, "training": training}
    result = calibrate(model, tokenizer, 0.4, family="learned", tokens=512, context=128, **kwargs)
    assert result.family == "learned" and isinstance(result.policy, dmr.LearnedAllocator)
    assert result.reduction >= 0.39 and result.policy.record["config"]["target_reduction"] == 0.4
    assert [m["stage"] for m in result.history] == ["native", "learned"]
    both = calibrate(model, tokenizer, 0.4, families=("top_p", "learned"), tokens=512, context=128, **kwargs)
    assert both.family in ("top_p", "learned")
    assert both.nll == min(
        m["nll"] for m in both.history if m["stage"] != "native" and m["reduction"] >= 0.39
    )
    with pytest.raises(dmr.TargetUnreachableError, match="learned"):  # top-4 of 8: at most 75% fewer
        calibrate(model, tokenizer, 0.9, family="learned", tokens=512, context=128, **kwargs)


def test_learned_family_with_the_quantile_budget_lands_exactly_on_the_target(tokenizer):  # type: ignore[no-untyped-def]
    long_docs = [" ".join(DOCS)] * 3
    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    training = dmr.AllocatorTraining(steps=10, batch_windows=2, offset_iterations=8)
    kwargs = {"documents": long_docs, "train_documents": long_docs, "training": training}
    result = calibrate(
        model, tokenizer, 0.4, family="learned", tokens=512, context=128, learned_budget="quantile", **kwargs
    )
    assert isinstance(result.policy, dmr.LearnedAllocator) and result.policy.budget == "quantile"
    assert result.reduction == pytest.approx(0.4, abs=1e-3)  # one call of 508 tokens: exact to a pair
    with pytest.raises(dmr.PolicyError) as err:
        calibrate(model, tokenizer, 0.4, family="learned", learned_budget="per-token", **kwargs)
    assert err.value.field == "learned_budget"


def test_unreachable_and_invalid_targets(tokenizer):  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral", vocab_size=len(tokenizer))  # top-2: at most 50% fewer routed FLOPs
    with pytest.raises(dmr.TargetUnreachableError, match="lower the target"):
        calibrate(
            model,
            tokenizer,
            0.9,
            documents=DOCS,
            tokens=256,
            context=128,
            per_layer=False,
            families=tuple(KNOBS),
        )
    for bad in (0.0, 1.0, -0.2, "0.3"):
        with pytest.raises(dmr.PolicyError, match="target_reduction"):
            calibrate(model, tokenizer, bad, documents=DOCS)
    with pytest.raises(dmr.PolicyError, match="unknown policy family"):
        calibrate(model, tokenizer, 0.3, documents=DOCS, family="nucleus")


def test_cli_calibrate_then_eval_reads_the_policy(tmp_path, capsys):  # type: ignore[no-untyped-def]
    out, report = tmp_path / "policy.json", tmp_path / "report.json"
    model_dir = str(ROOT / "models" / "ref-mixtral")
    args = ["calibrate", "--model", model_dir, "--target-reduction", "0.3", "--family", "top_p", "--tokens"]
    code = main([*args, "1024", "--global-only", "--out", str(out), "--report", str(report), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["reduction"] >= 0.3 and json.loads(report.read_text()) == printed
    policy = dmr.load_policy(out)
    assert isinstance(policy, dmr.TopP)
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times.\n")
    assert main(["eval", "--model", model_dir, "--text", str(text), "--policy", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == policy.to_dict()
    assert main(["calibrate", "--model", model_dir, "--target-reduction", "0.95", "--out", str(out)]) == 2
    assert "lower the target" in capsys.readouterr().err


def test_cache_replays_the_calibration_without_running_the_model(tokenizer, monkeypatch):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.calibrate as cal

    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    cache: dict = {}  # type: ignore[type-arg]
    saved = []
    first = calibrate(model, tokenizer, 0.3, documents=DOCS, family="top_p", tokens=512, context=128,
                      cache=cache, on_measure=lambda c: saved.append(len(c)))  # fmt: skip
    assert saved == list(range(1, len(cache) + 1))  # called after each new measurement
    assert len(cache) == len({json.dumps(m, sort_keys=True) for m in cache})  # one entry per policy

    def no_model(self, policy):  # type: ignore[no-untyped-def]
        raise AssertionError("a cached measurement was run again")

    monkeypatch.setattr(cal._Meter, "_measure", no_model)
    again = calibrate(model, tokenizer, 0.3, documents=DOCS, family="top_p", tokens=512, context=128,
                      cache=dict(cache))  # fmt: skip
    assert again.policy == first.policy and again.nll == first.nll and again.history == first.history
    if first.per_layer:  # every MoE layer has its own override, so the file carries no unused default
        assert set(first.policy.overrides) == {0, 1} and first.policy.default is None


def test_cli_calibrate_interrupted_then_resumed(tmp_path, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.calibrate as cal

    out = tmp_path / "policy.json"
    partial = tmp_path / "policy.json.partial.json"
    args = ["calibrate", "--model", str(ROOT / "models" / "ref-mixtral"), "--target-reduction", "0.3",
            "--family", "top_p", "--tokens", "512", "--global-only", "--out", str(out), "--json"]  # fmt: skip
    real = cal._Meter._measure
    calls = []

    def interrupt_second(self, policy):  # type: ignore[no-untyped-def]
        calls.append(policy)
        if len(calls) == 2:  # after the native pass, in the first search
            raise KeyboardInterrupt
        return real(self, policy)

    monkeypatch.setattr(cal._Meter, "_measure", interrupt_second)
    assert main(args) == 130
    _, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert "1 finished measurements" in line and str(partial) in line and "--resume" in line
    assert len(json.loads(partial.read_text())["measurements"]) == 1 and not out.exists()

    calls.clear()
    monkeypatch.setattr(
        cal._Meter, "_measure", lambda self, policy: (calls.append(policy), real(self, policy))[1]
    )
    assert main([*args, "--resume"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(calls) == len(report["measurements"]) - 1  # the saved one was not run again
    assert dmr.load_policy(out) == dmr.policies.policy_from_dict(report["policy"]) and not partial.exists()
    monkeypatch.setattr(cal._Meter, "_measure", real)
    assert main(args) == 0  # a fresh run finds the same policy
    assert json.loads(capsys.readouterr().out)["policy"] == report["policy"]


@pytest.mark.parametrize(
    ("saved", "resume", "message"),
    [
        ('{"measurements": {}}', False, "pass --resume to continue it, or delete it to start over"),
        ("[1, 2]", True, "not a dmr calibrate partial-results file"),
        ('{"kind": "calibration.partial"}', True, "not a dmr calibrate partial-results file"),
        ('{"measurements": [0.1, 2.0]}', True, "not a dmr calibrate partial-results file"),
        ('{"measurements": {"native": [0.0]}}', True, "not a dmr calibrate partial-results file"),
    ],
)
def test_cli_calibrate_partial_file_problems_fail_before_loading(
    saved, resume, message, tmp_path, capsys, monkeypatch
):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.eval as ev

    monkeypatch.setattr(ev, "load_checkpoint", lambda *_: pytest.fail("a model was loaded"))
    partial = tmp_path / "policy.json.partial.json"
    partial.write_text(saved, encoding="utf-8")
    args = ["calibrate", "--model", str(ROOT / "models" / "ref-mixtral"), "--target-reduction", "0.3",
            "--out", str(tmp_path / "policy.json")]  # fmt: skip
    assert main([*args, *(["--resume"] if resume else [])]) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert out == "" and line.startswith("error: ") and message in line and str(partial) in line
    assert partial.read_text(encoding="utf-8") == saved  # never overwritten


def test_routing_stats_predict_the_first_layers_reduction_exactly(tokenizer):  # type: ignore[no-untyped-def]
    """The statistics come from the native pass: exact where the routing's inputs cannot drift (the
    first MoE layer, the others native), a guide elsewhere."""
    from dynamic_moe_router.calibrate import RoutingStats, calibration_windows

    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    windows = calibration_windows(tokenizer, DOCS, 512, 128)[:, :-1]
    stats = RoutingStats.record(model, windows, batch_size=2)
    for policy in (dmr.TopP(p=0.6), dmr.RelativeThreshold(beta=0.4), dmr.StaticTopK(k=1)):
        first_only = dmr.PerLayer(dmr.StaticTopK(), {0: policy})
        with dmr.patched(model, first_only), dmr.profile(model, count_dense=False) as report:
            model(windows)
        measured = report.to_dict()["routed_flop_reduction"]
        assert measured > 0 and stats.reduction(first_only) == pytest.approx(measured, abs=1e-12)
    assert stats.reduction(dmr.StaticTopK()) == 0.0


@pytest.mark.parametrize("drift", [-0.04, 0.0, 0.03])
def test_search_lands_just_past_the_target_in_few_probes(drift):  # type: ignore[no-untyped-def]
    """The measured reduction differs from the predicted one by a drift the search must correct."""
    from dynamic_moe_router.calibrate import SEARCH_TOLERANCE, _search

    def predict(x: float) -> float:
        return 0.6 * x**1.5

    probes = []

    def measure(x: float) -> tuple[float, float]:
        probes.append(x)
        red = min(1.0, max(0.0, predict(x) * (1 + drift) + drift * x))
        return red, 3.0 + red  # NLL rises with the reduction

    x, red, nll, _ = _search(measure, predict, 0.0, 0.99, 0.3, budget=6)
    assert x is not None and 0.3 <= red <= 0.3 + SEARCH_TOLERANCE and nll == 3.0 + red
    assert len(probes) <= 4


def test_search_reports_an_unreachable_target():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.calibrate import _search

    probes = []

    def measure(x: float) -> tuple[float, float]:
        probes.append(x)
        return 0.5 * x, 1.0

    x, red, _, _ = _search(measure, lambda x: 0.5 * x, 0.0, 0.9, 0.6, budget=5)
    assert x is None and red == pytest.approx(0.45) and probes[-1] == 0.9 and len(probes) <= 2


def test_a_native_prefix_is_replayed_and_gives_the_full_runs_numbers(tokenizer):  # type: ignore[no-untyped-def]
    """A sensitivity probe routes layers before its own natively: the native pass's decoder outputs
    stand in for them (not run again), with the same reduction and NLL as a full run."""
    import dynamic_moe_router.calibrate as cal

    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    windows = cal.calibration_windows(tokenizer, DOCS, 512, 128)
    policy = dmr.PerLayer(dmr.StaticTopK(), {1: dmr.TopP(p=0.5)})
    replaying = cal._Meter(model, windows, 2)
    replaying(None)  # the native pass records the prefix
    assert replaying._prefix is not None and replaying._prefix.first_dynamic(policy) == 1
    assert replaying._prefix.first_dynamic(dmr.TopP(p=0.5)) == 0
    first_decoder = model.model.layers[0]
    own = first_decoder.forward  # an instance-level forward (as accelerate's hooks install) survives
    first_decoder.forward = own
    runs = []  # the decoder layer's own work (its module call, hooks included, still happens)
    hook = first_decoder.self_attn.register_forward_pre_hook(lambda *_: runs.append(1))
    try:
        replayed = replaying._measure(policy)
    finally:
        hook.remove()
    full = cal._Meter(model, windows, 2)._measure(policy)  # no native pass: every layer runs
    assert runs == [] and replayed == full and replayed[0] > 0
    assert first_decoder.__dict__["forward"] is own  # the instance's own forward is back
    del first_decoder.forward
    # on the first window only (a sensitivity probe, part of a batch): a run on that window
    assert replaying.probe == 1
    assert replaying(policy, windows=1) == cal._Meter(model, windows[:1], 2)._measure(policy)
    assert set(replaying.cache) == {"native", cal.measurement_key(policy) + "@1"}  # cached apart


def test_a_judging_meter_runs_the_native_pass_unrecorded(tokenizer):  # type: ignore[no-untyped-def]
    """Held-out windows only judge candidates: their native pass records no routing statistics and
    no prefix (nothing reads them) and measures what the recording pass measures."""
    import dynamic_moe_router.calibrate as cal

    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    windows = cal.calibration_windows(tokenizer, DOCS, 512, 128)
    judge = cal._Meter(model, windows, 2, keep_prefix=False, record_stats=False)
    recording = cal._Meter(model, windows, 2)
    assert judge(None) == recording(None)
    assert judge._stats is None and judge._prefix is None  # nothing recorded
    assert recording._stats is not None and recording._prefix is not None


def test_cli_no_learned_with_a_family_is_refused_before_loading(tmp_path, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.eval as ev

    monkeypatch.setattr(ev, "load_checkpoint", lambda *_: pytest.fail("a model was loaded"))
    args = ["calibrate", "--model", str(ROOT / "models" / "ref-mixtral"), "--target-reduction", "0.3",
            "--family", "top_p", "--no-learned", "--out", str(tmp_path / "policy.json")]  # fmt: skip
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--no-learned" in err and "--family top_p" in err
    assert not (tmp_path / "policy.json").exists()


def test_only_the_two_best_families_are_refined_per_layer(tokenizer):  # type: ignore[no-untyped-def]
    """The per-layer refinement (its sensitivity probes on a quarter of the windows) runs for the two
    families with the lowest global NLL increase; the third keeps its global result, marked skipped."""
    import dynamic_moe_router.calibrate as cal

    model = tiny_model("mixtral", vocab_size=len(tokenizer))
    result = calibrate(model, tokenizer, 0.3, documents=DOCS, families=tuple(KNOBS), tokens=1024, context=128)
    history = result.history
    globals_ = {m["family"]: m for m in history if m["stage"] == "global" and m["reduction"] >= 0.3}
    assert len(globals_) == 3, "every family reaches 30% here, so the refinement has to choose"
    refined = {m["family"] for m in history if m["stage"] == "per_layer"}
    skipped = {m["family"] for m in history if m["stage"] == "per_layer_skipped"}
    best_global = {f for f, _ in sorted(globals_.items(), key=lambda kv: kv[1]["nll"])[: cal.REFINE_FAMILIES]}
    assert refined <= best_global and skipped == set(globals_) - refined and len(skipped) >= 1
    probes = [m for m in history if m["stage"] == "sensitivity"]
    n = len(cal.calibration_windows(tokenizer, DOCS, 1024, 128))
    assert n >= 4 and probes and {m["windows"] for m in probes} == {n // 4}  # a quarter of them
    assert len(probes) == len(refined) * 2  # one probe per MoE layer (2) per refined family


def test_a_measurement_on_part_of_the_windows_takes_whole_batches_or_one_partial(tokenizer):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.calibrate as cal
    from dynamic_moe_router.errors import PolicyError

    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    windows = cal.calibration_windows(tokenizer, DOCS, 1024, 128)
    assert len(windows) == 4
    meter = cal._Meter(model, windows, 2)
    assert meter.probe == 1  # a quarter of the windows, part of a batch
    for bad in (0, 3):
        with pytest.raises(PolicyError, match="whole batches of 2 or one partial batch"):
            meter(dmr.TopP(p=0.5), windows=bad)
    assert meter(dmr.TopP(p=0.5), windows=1)[1] > 0 and meter(dmr.TopP(p=0.5), windows=2)[1] > 0
    assert cal._Meter(model, windows, 1).probe == 1 and cal._Meter(model, windows[:3], 2).probe == 1
    assert cal._Meter(model, windows[:1], 2).probe is None  # one window: no part to take


@pytest.mark.parametrize(
    "option", [["--train-steps", "50"], ["--train-windows", "8"], ["--budget", "quantile"]]
)
@pytest.mark.parametrize("extra", [["--no-learned"], ["--family", "top_p"]])
def test_cli_learned_options_without_the_learned_family_are_refused_before_loading(
    tmp_path, capsys, monkeypatch, extra, option
):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.eval as ev

    monkeypatch.setattr(ev, "load_checkpoint", lambda *_: pytest.fail("a model was loaded"))
    args = ["calibrate", "--model", str(ROOT / "models" / "ref-mixtral"), "--target-reduction", "0.3",
            *option, *extra, "--out", str(tmp_path / "policy.json")]  # fmt: skip
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and option[0] in err and extra[-1] in err
    assert not (tmp_path / "policy.json").exists()


@pytest.mark.parametrize(
    ("windows", "batch", "expected"),
    # whole batches nearest a quarter, halves up: 40 -> 10 -> 8; 80 -> 20 -> 24; 144 -> 36 -> 40
    [
        (32, 8, 8),
        (48, 8, 16),
        (40, 8, 8),
        (56, 8, 16),
        (80, 8, 24),
        (144, 8, 40),
        (12, 8, 3),
        (3, 8, 1),
        (1, 8, None),
    ],
)
def test_probe_takes_about_a_quarter_of_the_windows(windows, batch, expected):  # type: ignore[no-untyped-def]
    import torch

    from dynamic_moe_router.calibrate import _Meter

    meter = _Meter(None, torch.zeros(windows, 5, dtype=torch.long), batch)
    assert meter.probe == expected


def test_replay_cuts_recorded_outputs_to_the_batch_whatever_the_argument_name():  # type: ignore[no-untyped-def]
    import torch

    from dynamic_moe_router.calibrate import _replay

    recorded = torch.arange(24.0).reshape(4, 3, 2)  # (B, S, H)
    assert torch.equal(_replay(iter([recorded]), torch.zeros(2, 3, 2)), recorded[:2])
    assert torch.equal(_replay(iter([recorded]), hidden_states=torch.zeros(3, 3, 2)), recorded[:3])
    assert torch.equal(
        _replay(iter([recorded]), mask=torch.ones(4, 3, 3), x=torch.zeros(1, 3, 2)), recorded[:1]
    )
    with pytest.raises(dmr.errors.UnsupportedModelError, match="without its hidden states"):
        _replay(iter([recorded]), mask=torch.ones(4, 3, 3))


def test_cli_train_options_reach_the_training_config_and_the_resume_header(tmp_path, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    import dynamic_moe_router.calibrate as cal

    seen = []

    def capture(*args, training=None, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(training)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(cal, "calibrate", capture)
    out = tmp_path / "policy.json"
    args = ["calibrate", "--model", str(ROOT / "models" / "ref-mixtral"), "--target-reduction", "0.3",
            "--family", "learned", "--train-steps", "800", "--out", str(out)]  # fmt: skip
    assert main([*args, "--train-windows", "8"]) == 130
    assert (seen[-1].steps, seen[-1].batch_windows) == (800, 8)
    # partial results written before --train-windows existed were trained with 4 windows per step
    partial = tmp_path / "policy.json.partial.json"
    header = {"kind": "calibration.partial", "model": str((ROOT / "models" / "ref-mixtral").resolve()),
              "target_reduction": 0.3, "family": "learned", "no_learned": False, "tokens": 8192,
              "per_layer": True, "train_steps": 800, "budget": "threshold", "measurements": {}}  # fmt: skip
    partial.write_text(json.dumps(header))
    assert main([*args, "--resume"]) == 130 and seen[-1].batch_windows == 4
    capsys.readouterr()
    assert main([*args, "--train-windows", "8", "--resume"]) == 2
    assert "other train_windows" in capsys.readouterr().err


def test_static_family_takes_slots_from_the_least_sensitive_layers_first(tokenizer):  # type: ignore[no-untyped-def]
    """The static top-k candidate (the baseline a dynamic family has to beat) reaches the target
    with whole slots, taking each from the layer whose probe costs least; with per_layer=False it
    is one uniform k."""
    from dynamic_moe_router.calibrate import calibration_windows

    model = tiny_model("mixtral", vocab_size=len(tokenizer), num_hidden_layers=3)  # top-2 of 8, 3 layers
    result = calibrate(model, tokenizer, 0.3, documents=DOCS, family="static", tokens=1024, context=128)
    assert result.family == "static" and result.per_layer and isinstance(result.policy, dmr.PerLayer)
    ks = {layer: p.k for layer, p in result.policy.overrides.items()}
    assert set(ks) == {0, 1, 2} and all(k in (1, 2) for k in ks.values())
    assert sum(2 - k for k in ks.values()) == 2  # ceil(0.3 * 6) slots per token
    assert result.reduction == pytest.approx(2 / 6)
    probes = {m["layer"]: m["nll"] for m in result.history if m["stage"] == "static_probe" and "layer" in m}
    assert set(probes) == {0, 1, 2}
    # the one layer kept at k = 2 is the most sensitive one alone
    assert max(probes, key=probes.__getitem__) == next(i for i, k in ks.items() if k == 2)
    # the reported NLL is the chosen policy's own next-token NLL on the calibration windows
    windows = calibration_windows(tokenizer, DOCS, 1024, 128)  # (N, context + 1)
    with torch.no_grad(), dmr.patched(model, result.policy):
        logits = model(windows[:, :-1]).logits.float()  # (N, context, V)
    chosen = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert float(chosen) == pytest.approx(result.nll, rel=1e-4)

    uniform = calibrate(
        model, tokenizer, 0.3, documents=DOCS, family="static", tokens=1024, context=128, per_layer=False
    )
    assert uniform.policy == dmr.StaticTopK(k=1) and not uniform.per_layer
    assert uniform.reduction == pytest.approx(0.5)


class _SlotMeter:
    """A stand-in for calibrate's meter: the reduction of a static allocation is its share of the
    native slots (the measured one lags by ``lag`` slots, as when later layers' inputs drift), and a
    probe's NLL grows with the slots its one layer gives up, ``cost[layer]`` per slot."""

    probe = 1

    def __init__(self, native: dict[int, int], cost: dict[int, float], lag: int = 0) -> None:
        self.native, self.cost, self.lag, self.calls = native, cost, lag, []
        self.stats = self

    def ks(self, policy) -> dict[int, int]:  # type: ignore[no-untyped-def]
        if policy is None:
            return dict(self.native)
        if isinstance(policy, dmr.StaticTopK):
            return {i: policy.k or v for i, v in self.native.items()}
        default = policy.default.k if policy.default is not None else None
        return {
            i: (policy.overrides[i].k if i in policy.overrides else default) or v
            for i, v in self.native.items()
        }

    def reduction(self, policy, lag: int = 0) -> float:  # type: ignore[no-untyped-def]
        dropped = sum(self.native[i] - k for i, k in self.ks(policy).items())
        return max(0, dropped - lag) / sum(self.native.values())

    def __call__(self, policy, windows=None, stage="", **info):  # type: ignore[no-untyped-def]
        self.calls.append(stage)
        ks = self.ks(policy)
        nll = 1.0 + sum(self.cost[i] * (self.native[i] - k) for i, k in ks.items())
        return self.reduction(policy, self.lag if stage == "static" else 0), nll


def _layers(native: dict[int, int]) -> list:  # type: ignore[type-arg]
    from types import SimpleNamespace

    return [SimpleNamespace(index=i, native_k=k) for i, k in native.items()]


def test_static_uniform_cut_counts_layers_clamped_at_k_one():  # type: ignore[no-untyped-def]
    """With native k 8 and 2, a cut of 4 (k 4 and 1) drops 5 of 10 slots: the smallest cut for
    50%; at 80% only k = 1 everywhere reaches it (a cut of 7)."""
    from dynamic_moe_router.calibrate import _calibrate_static

    native = {0: 8, 1: 2}
    for target, want in ((0.5, {0: 4, 1: 1}), (0.8, {0: 1, 1: 1}), (0.95, {0: 1, 1: 1})):
        meter = _SlotMeter(native, {0: 1.0, 1: 1.0})
        result = _calibrate_static(meter, _layers(native), target, 1.0, False)
        assert meter.ks(result.policy) == want, target
        assert result.reduction == pytest.approx(1 - sum(want.values()) / 10)
        if len(set(want.values())) == 1:  # one k everywhere: a plain global policy
            assert result.policy == dmr.StaticTopK(k=1)


def test_static_per_layer_takes_the_cheapest_slots_and_measures_again_when_short():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.calibrate import _calibrate_static

    native = {0: 4, 1: 4, 2: 2}
    meter = _SlotMeter(native, {0: 3.0, 1: 1.0, 2: 2.0})
    result = _calibrate_static(meter, _layers(native), 0.4, 1.0, True)  # 4 of 10 slots
    assert {i: p.k for i, p in result.policy.overrides.items()} == {0: 4, 1: 1, 2: 1}
    assert meter.calls.count("static") == 1 and result.reduction == pytest.approx(0.4)
    # the measured reduction lags the estimate by one slot: one more slot, measured again
    meter = _SlotMeter(native, {0: 3.0, 1: 1.0, 2: 2.0}, lag=1)
    result = _calibrate_static(meter, _layers(native), 0.4, 1.0, True)
    assert {i: p.k for i, p in result.policy.overrides.items()} == {0: 3, 1: 1, 2: 1}
    assert meter.calls.count("static") == 2 and result.reduction == pytest.approx(0.4)


def test_static_family_counts_flops_on_zero_expert_models(tokenizer):  # type: ignore[no-untyped-def]
    """longcat_flash's zero-computation experts run nothing: a slot dropped there saves no FLOPs,
    so the static family takes slots until the executed FLOPs fall by the target."""
    model = tiny_model("longcat_flash", vocab_size=len(tokenizer))
    result = calibrate(model, tokenizer, 0.15, documents=DOCS, family="static", tokens=512, context=128)
    assert result.family == "static" and result.reduction >= 0.15
    with dmr.patched(model, result.policy), dmr.profile(model, count_dense=False) as report:
        from dynamic_moe_router.calibrate import calibration_windows

        windows = calibration_windows(tokenizer, DOCS, 512, 128)
        with torch.no_grad():
            model(windows[:, :-1])
    assert report.to_dict()["routed_flop_reduction"] == pytest.approx(result.reduction, abs=1e-6)


def test_static_family_reports_its_reach_when_the_target_is_too_far(tokenizer):  # type: ignore[no-untyped-def]
    model = tiny_model("mixtral", vocab_size=len(tokenizer))  # top-2: at most 50% fewer routed FLOPs
    with pytest.raises(dmr.TargetUnreachableError, match=r"static: 50\.0%"):
        calibrate(model, tokenizer, 0.6, documents=DOCS, family="static", tokens=256, context=128)


LONG_DOCS = [f"Chapter {i}. " + " ".join([DOCS[0]] * 8) for i in range(9)]  # ~630 tokens each


def test_held_out_windows_skip_the_documents_the_tuning_windows_read(tokenizer):  # type: ignore[no-untyped-def]
    from dynamic_moe_router.calibrate import SELECT_MIN_WINDOWS, held_out_windows

    doc_ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in LONG_DOCS]
    tokens = len(doc_ids[0]) + 10  # the tuning text: document 0, its eos, the start of document 1
    held = held_out_windows(tokenizer, LONG_DOCS, tokens, 128)
    assert held is not None and held.shape == (len(LONG_DOCS) - 2, 129)
    for row, ids in zip(held.tolist(), doc_ids[2:], strict=True):  # documents 2.. in order
        assert row == ids[3 * 128 + 1 : 3 * 128 + 1 + 129]  # past the learned budget's windows
    # document 1 starts at token len(doc 0) + 1 (after an eos): unseen while the tuning text ends before it
    assert len(held_out_windows(tokenizer, LONG_DOCS, len(doc_ids[0]), 128)) == len(LONG_DOCS) - 1
    assert len(held_out_windows(tokenizer, LONG_DOCS, len(doc_ids[0]) + 1, 128)) == len(LONG_DOCS) - 2
    # too few unseen documents: no held-out choice
    assert held_out_windows(tokenizer, LONG_DOCS[: SELECT_MIN_WINDOWS + 1], tokens, 128) is None
    assert held_out_windows(tokenizer, DOCS, 256, 128) is None  # documents shorter than a window's offset


def test_held_out_windows_start_after_the_learned_familys_budget_windows(tokenizer):  # type: ignore[no-untyped-def]
    """A held-out window shares no token with the budget windows that ``allocator_windows`` takes
    from the same document (the learned family fits its budget on those)."""
    from dynamic_moe_router.calibrate import held_out_windows
    from dynamic_moe_router.learn import allocator_windows
    from dynamic_moe_router.learn.windows import ALLOCATOR_WINDOWS

    context, per_doc = 64, ALLOCATOR_WINDOWS["budget"][0]
    doc = LONG_DOCS[3]
    ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
    budget = allocator_windows(tokenizer, [doc], "budget", context=context)
    assert budget.shape == (per_doc, context + 1)
    budget_end = context + per_doc * context + 1  # one past the last budget token
    assert budget[-1].tolist() == ids[budget_end - context - 1 : budget_end]
    held = held_out_windows(tokenizer, [LONG_DOCS[0], *[doc] * 5], 10, context)
    assert held is not None
    assert held[0].tolist() == ids[budget_end : budget_end + context + 1]  # the first token after them


def test_families_are_chosen_on_held_out_windows(tokenizer):  # type: ignore[no-untyped-def]
    """The score families are tuned on the calibration windows; the winner is the candidate with
    the lowest NLL on held-out windows, recomputed here independently."""
    from dynamic_moe_router.calibrate import held_out_windows

    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    families = ("top_p", "relative_threshold", "static")
    result = calibrate(
        model,
        tokenizer,
        0.3,
        documents=LONG_DOCS,
        families=families,
        tokens=512,
        context=128,
        per_layer=False,
    )
    sel = result.selection
    assert sel is not None and sel["windows"] == len(LONG_DOCS) - 1 and set(sel["nll"]) == set(families)
    assert result.family == min(sel["eligible"], key=sel["nll"].__getitem__)
    held = held_out_windows(tokenizer, LONG_DOCS, 512, 128)
    with torch.no_grad(), dmr.patched(model, result.policy):
        logits = model(held[:, :-1]).logits.float()  # (N, context, V)
    chosen = torch.nn.functional.cross_entropy(logits.flatten(0, 1), held[:, 1:].flatten())
    assert float(chosen) == pytest.approx(sel["nll"][result.family], rel=1e-4)
    stages = [m["stage"] for m in result.history if m["stage"].startswith("held_out")]
    assert stages == ["held_out_native"] + ["held_out"] * len(families)
    # one family, or too little text: chosen on the tuning windows, as before
    one = calibrate(model, tokenizer, 0.3, documents=LONG_DOCS, family="top_p", tokens=512, context=128)
    short = calibrate(model, tokenizer, 0.3, documents=DOCS, families=families, tokens=512, context=128)
    assert one.selection is None and short.selection == {"windows": 0}


@pytest.mark.parametrize(
    ("held", "winner"),
    [
        ({"static": (0.3, 5.0), "top_p": (0.3, 1.0), "relative_threshold": (0.3, 3.0)}, "top_p"),
        # top_p saves too little on the held-out text: it may not win by that
        (
            {"static": (0.3, 5.0), "top_p": (0.28, 1.0), "relative_threshold": (0.3, 3.0)},
            "relative_threshold",
        ),
        # none saves enough there: the one that saves most
        (
            {"static": (0.25, 5.0), "top_p": (0.2, 1.0), "relative_threshold": (0.27, 3.0)},
            "relative_threshold",
        ),
    ],
)
def test_the_held_out_measurements_choose_the_family(tokenizer, monkeypatch, held, winner):  # type: ignore[no-untyped-def]
    """Whatever the calibration windows say, the held-out windows decide (stand-in measurements)."""
    from dynamic_moe_router import calibrate as cal

    real = cal._Meter.__call__

    def measure(self, policy, *, windows=None, **note):  # type: ignore[no-untyped-def]
        if self.key == "held_out" and policy is not None:
            self.history.append({"stage": note["stage"], "family": note["family"]})
            return held[note["family"]]
        return real(self, policy, windows=windows, **note)

    monkeypatch.setattr(cal._Meter, "__call__", measure)
    model = tiny_model("olmoe", vocab_size=len(tokenizer))
    result = calibrate(
        model, tokenizer, 0.3, documents=LONG_DOCS, families=tuple(held), tokens=512, context=128,
        per_layer=False,
    )  # fmt: skip
    assert result.family == winner and result.selection is not None
    assert result.selection["nll"] == {family: nll for family, (_, nll) in held.items()}


def test_cli_names_how_the_family_was_chosen():  # type: ignore[no-untyped-def]
    from dynamic_moe_router.cli import _selection_lines

    assert _selection_lines(None) == ""
    nll, reduction = {"top_p": 3.03, "learned": 3.01}, {"top_p": 0.351, "learned": 0.34}
    line = _selection_lines({"windows": 16, "native_nll": 3.0, "nll": nll, "reduction": reduction})
    want = "learned +1.01% at 34.0% fewer, top_p +3.05% at 35.1% fewer"  # best first
    assert line == f"  chosen on 16 held-out valid windows: {want}\n"
    selection = {"windows": 16, "native_nll": 3.0, "nll": nll, "reduction": reduction, "eligible": ["top_p"]}
    assert "learned +1.01% at 34.0% fewer (saves too little there), top_p" in _selection_lines(selection)
    assert "calibration windows" in _selection_lines({"windows": 0})
