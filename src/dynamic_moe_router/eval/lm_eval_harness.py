"""lm-evaluation-harness integration: the ``dmr`` model class and the ``dmr-lm-eval`` command.

Install the extra (``pip install "dynamic-moe-router-kit[lm-eval]"``), then::

    dmr-lm-eval --model dmr --model_args pretrained=DIR,policy=policy.json --tasks hellaswag

``dmr-lm-eval`` is lm-eval's own command line (every lm-eval flag works) with the ``dmr`` model
registered: lm-eval has no plugin discovery for external packages, so the command imports this
module, which registers the model, and then runs lm-eval's entry point. The ``dmr`` model is lm-eval's
Hugging Face model (``HFLM``, registered as ``hf``) plus:

- ``policy=`` in ``--model_args``: a policy JSON file (:func:`~dynamic_moe_router.load_policy`), a model
  folder holding a saved ``dmr_policy.json`` (:func:`~dynamic_moe_router.from_pretrained`; ``auto`` is
  the ``pretrained`` folder's), a spec ``NAME:key=value`` (quote a spec with commas:
  ``"policy='top_p:p=0.6,max_k=3'"``), or ``native`` (no patch; the native routing is still profiled).
  Without it, the policy saved in the ``pretrained`` folder runs if there is one, else the native
  routing, as with ``dmr eval``. A bad value raises the library's typed error
  (:class:`~dynamic_moe_router.PolicyFileError`, :class:`~dynamic_moe_router.PolicyError`,
  :class:`~dynamic_moe_router.PolicyNotFoundError`) before the model loads;
- the model is patched for each batch of requests lm-eval sends (``loglikelihood``,
  ``loglikelihood_rolling``, ``generate_until``) and unpatched after it, so it is never left patched;
- every request runs inside :func:`dynamic_moe_router.profile`; the counts of all of them add up to
  one :class:`~dynamic_moe_router.ProfileReport` (``DMRLM.dmr_report``). ``dmr-lm-eval`` prints which
  policy ran and the routed-FLOP reduction and mean k after lm-eval's table, and lm-eval's results
  (``--output_path``) carry them under ``config``: ``dmr_policy``, ``dmr_policy_source``,
  ``dmr_profile``;
- ``dtype`` defaults to ``float32`` (lm-eval's ``hf`` loads the checkpoint's dtype), as ``dmr eval``
  loads models, so that the two score the same items alike; ``device`` defaults to ``cuda`` where
  there is one, else ``cpu`` (lm-eval's ``hf`` asks for ``cuda`` either way).

Importing this module imports no lm-eval model code: it only registers ``dmr`` in lm-eval's model
registry as a lazy entry (when lm-eval is installed), and the class is built when lm-eval, or
``DMRLM``, is first asked for it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DmrError, MissingDependencyError, PolicyFileError, PolicyNotFoundError

if TYPE_CHECKING:
    from ..policies import RoutingPolicy
    from ..report import ProfileReport

    DMRLM: type  # built on first access (see ``__getattr__``): a subclass of lm-eval's ``HFLM``

__all__ = ["DMRLM", "MODEL_NAME", "flop_line", "main", "register", "resolve_policy"]

#: the name the model is registered under in lm-eval (``--model dmr``)
MODEL_NAME = "dmr"
_INSTALL = "pip install 'dynamic-moe-router-kit[lm-eval]'"
_logger = logging.getLogger(__name__)
#: the ``dmr`` models made while :func:`main` runs (``None`` otherwise), for its closing lines
_COLLECTOR: list[Any] | None = None
_REGISTERED = False


def _require_lm_eval() -> None:
    """Raise :class:`~dynamic_moe_router.MissingDependencyError` naming the extra if lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401  # pyright: ignore[reportMissingImports]
    except ImportError as err:
        raise MissingDependencyError(
            f"the lm-evaluation-harness integration needs lm-eval; install the extra: {_INSTALL}"
        ) from err


def _model_folder(pretrained: Any) -> Path | None:
    """The local folder ``pretrained`` names or was loaded from, if any."""
    if isinstance(pretrained, (str, Path)):
        return Path(pretrained) if Path(pretrained).is_dir() else None
    if pretrained is None:
        return None
    from ..hf.patching import model_folder

    folder = model_folder(pretrained)
    return Path(folder) if folder is not None else None


def resolve_policy(value: Any, pretrained: Any = None) -> tuple[RoutingPolicy | None, str]:
    """``(policy, source)`` for ``policy=`` in ``--model_args``; ``None`` is the native routing.

    ``pretrained`` is the checkpoint folder (or a loaded model): its saved ``dmr_policy.json`` is the
    default and ``auto``'s. ``source`` says where the policy came from. Nothing is loaded but the
    policy file; a bad value raises a typed error.

    Example:
        >>> import dynamic_moe_router as dmr
        >>> from dynamic_moe_router.eval.lm_eval_harness import resolve_policy
        >>> resolve_policy("native")
        (None, 'native routing (policy=native)')
        >>> resolve_policy("top_p:p=0.6")
        (TopP(p=0.6, min_k=1, max_k=None), 'policy=top_p:p=0.6')
        >>> try:
        ...     resolve_policy("top_q")
        ... except dmr.PolicyFileError as err:
        ...     print(type(err).__name__)
        PolicyFileError
    """
    from ..policies import POLICY_FILE, RoutingPolicy, from_pretrained, load_policy, parse_policy

    folder = _model_folder(pretrained)
    if value is None or (isinstance(value, str) and not value.strip()):
        if folder is not None and (folder / POLICY_FILE).is_file():
            return from_pretrained(folder), str(folder / POLICY_FILE)
        return None, f"native routing (no policy=, no {POLICY_FILE} in the model folder)"
    if isinstance(value, RoutingPolicy):
        return value, f"policy={value.describe()}"
    forms = (
        f"a policy JSON file, a model folder holding {POLICY_FILE}, auto (the pretrained folder's), "
        "native, or a spec NAME:key=value (quoted when it has commas: \"policy='top_p:p=0.6,max_k=3'\")"
    )
    if not isinstance(value, str):
        raise PolicyFileError(f"policy={value!r} in --model_args: expected {forms}")
    text = value.strip()
    if text == "native":
        return None, "native routing (policy=native)"
    if text == "auto":
        if folder is None:
            raise PolicyNotFoundError(
                f"policy=auto reads {POLICY_FILE} from the pretrained folder, but pretrained={pretrained!r} "
                f"is not a local folder; pass {forms}"
            )
        return from_pretrained(folder), str(folder / POLICY_FILE)
    path = Path(text)
    if path.is_dir():
        return from_pretrained(path), str(path / POLICY_FILE)
    if text.endswith(".json") or path.is_file():
        return load_policy(path), str(path)
    try:
        return parse_policy(text), f"policy={text}"
    except PolicyFileError as err:
        raise PolicyFileError(f"policy={text!r} in --model_args: {err}; expected {forms}") from err


def _add_report(total: ProfileReport, more: ProfileReport) -> ProfileReport:
    """Add the counts of ``more`` (a profile of the same model) to ``total``; returns ``total``."""
    for a, b in zip(total.layers, more.layers, strict=True):
        a.tokens += b.tokens
        a.kept_pairs += b.kept_pairs
        a.executed_pairs += b.executed_pairs
        a.zero_expert_pairs += b.zero_expert_pairs
        a.native_zero_expert_pairs += b.native_zero_expert_pairs
        width = max(len(a.k_histogram), len(b.k_histogram))
        a.k_histogram = [
            (a.k_histogram[k] if k < len(a.k_histogram) else 0)
            + (b.k_histogram[k] if k < len(b.k_histogram) else 0)
            for k in range(width)
        ]
        if b.rank_executed_pairs:
            a.rank_executed_pairs = [
                x + y for x, y in zip(a.rank_executed_pairs or [0] * len(b.rank_executed_pairs),
                                      b.rank_executed_pairs, strict=True)
            ]  # fmt: skip
    total.shared_expert_flops += more.shared_expert_flops
    total.attention_flops += more.attention_flops
    total.other_flops += more.other_flops
    return total


def flop_line(report: ProfileReport | None) -> str:
    """The FLOP line of a run, worded as ``dmr eval`` words it.

    Example:
        >>> from dynamic_moe_router.report import LayerStats, ProfileReport
        >>> layer = LayerStats(0, 8, 2, 6, tokens=4, kept_pairs=6, executed_pairs=6, k_histogram=[0, 2, 2])
        >>> print(flop_line(ProfileReport("demo", "top_p(p=0.5)", [layer], dense_measured=False)))
        routed-expert FLOPs: 25.0% fewer than native; whole model: 25.0% fewer (mean k 1.500, 4 tokens)
    """
    if report is None:
        return "routed-expert FLOPs: no requests ran, nothing was profiled"
    d = report.to_dict()
    return (
        f"routed-expert FLOPs: {d['routed_flop_reduction']:.1%} fewer than native; whole model: "
        f"{d['total_flop_reduction']:.1%} fewer (mean k {d['mean_k']:.3f}, {d['tokens']:,} tokens)"
    )


def _build_class() -> type:
    """Define ``DMRLM`` on lm-eval's ``HFLM`` (imports lm-eval's model code and transformers)."""
    _require_lm_eval()
    import torch
    from lm_eval.models import huggingface  # pyright: ignore[reportMissingImports]

    from ..hf.families import get_family
    from ..hf.inspect import load_model_skeleton
    from ..hf.patching import patch, patched, unpatch
    from ..hf.profiling import profile

    hflm: Any = huggingface.HFLM  # lm-eval's ``hf`` model (its decorator leaves the class untyped)

    class DMRLM(hflm):
        """lm-eval's Hugging Face model under a dynamic routing policy, profiled (``--model dmr``).

        Args:
            pretrained: a checkpoint folder (or hub name, or a loaded transformers model) of a
                supported MoE family, as for lm-eval's ``hf``.
            policy: see :func:`resolve_policy`; default: the folder's saved policy, else native.
            **kwargs: lm-eval's ``hf`` model arguments; ``dtype`` defaults to ``float32`` and
                ``device`` to ``cuda`` where there is one, else ``cpu``.

        Attributes:
            dmr_policy: the policy that runs (``None``: the native routing, unpatched).
            dmr_policy_source: where it came from.
            dmr_report: the profile of every request so far (``None`` before the first).
        """

        def __init__(self, pretrained: Any, policy: Any = None, **kwargs: Any) -> None:
            # every check that needs no weights comes before lm-eval loads the model
            self.dmr_policy, self.dmr_policy_source = resolve_policy(policy, pretrained)
            if isinstance(pretrained, (str, Path)) and Path(pretrained).is_dir():
                load_model_skeleton(str(pretrained))  # no config.json / unsupported family: typed errors
                pretrained = str(pretrained)
            kwargs.setdefault("dtype", "float32")
            if kwargs.get("device") is None:  # lm-eval's default is "cuda", even on a machine without one
                kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
            super().__init__(pretrained=pretrained, **kwargs)
            get_family(getattr(self.model.config, "model_type", ""))
            if self.dmr_policy is not None:  # does the policy fit this model? (a learned allocator may not)
                patch(self.model, self.dmr_policy)
                unpatch(self.model)
            self.dmr_report: ProfileReport | None = None
            self._dmr_active = False
            if _COLLECTOR is not None:  # under dmr-lm-eval: say which policy runs now, and again at the end
                _COLLECTOR.append(self)
                print(self._dmr_policy_line(), file=sys.stderr)
            else:
                _logger.info(self._dmr_policy_line())

        @property
        def dmr_policy_name(self) -> str:
            """The policy's short description (``native`` for the native routing)."""
            return self.dmr_policy.describe() if self.dmr_policy is not None else "native"

        @contextmanager
        def _dmr_requests(self) -> Iterator[None]:
            """Patch (unless native) and profile around one batch of requests; add up the counts."""
            if self._dmr_active:  # a request method calling another: already patched and profiled
                yield
                return
            self._dmr_active = True
            try:
                with ExitStack() as stack:
                    if self.dmr_policy is not None:
                        stack.enter_context(patched(self.model, self.dmr_policy))
                    report = stack.enter_context(profile(self.model))
                    yield
                # both blocks are closed here: the report is complete and the model unpatched
                self.dmr_report = report if self.dmr_report is None else _add_report(self.dmr_report, report)
            finally:
                self._dmr_active = False

        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            with self._dmr_requests():
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
            with self._dmr_requests():
                return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
            with self._dmr_requests():
                return super().generate_until(requests, disable_tqdm=disable_tqdm)

        def get_model_info(self) -> dict[str, Any]:
            """lm-eval's model information, plus the policy and the profile of the run."""
            info = dict(super().get_model_info())
            info["dmr_policy"] = self.dmr_policy.to_dict() if self.dmr_policy is not None else None
            info["dmr_policy_source"] = self.dmr_policy_source
            info["dmr_profile"] = self.dmr_report.to_dict() if self.dmr_report is not None else None
            return info

        def _dmr_policy_line(self) -> str:
            return f"dmr: policy {self.dmr_policy_name} (from {self.dmr_policy_source})"

        def dmr_summary(self) -> str:
            """Two lines: the policy that ran and where it came from, and the FLOP line of the run."""
            return f"{self._dmr_policy_line()}\ndmr: {flop_line(self.dmr_report)}"

    DMRLM.__module__ = __name__
    DMRLM.__qualname__ = "DMRLM"
    return DMRLM


def __getattr__(name: str) -> Any:
    if name == "DMRLM":
        cls = _build_class()
        globals()["DMRLM"] = cls  # later lookups skip this function
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register ``dmr`` in lm-eval's model registry, lazily (idempotent).

    The entry points at ``DMRLM`` in this module, which lm-eval builds when it first asks for the
    model. lm-eval's own models are registered first: its registry imports them only while empty.
    """
    global _REGISTERED
    _require_lm_eval()
    if _REGISTERED:
        return
    import lm_eval.models  # noqa: F401  # pyright: ignore[reportMissingImports]
    from lm_eval.api.registry import model_registry  # pyright: ignore[reportMissingImports]

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=f"{__name__}:DMRLM")
    _REGISTERED = True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dmr-lm-eval``: lm-eval's command line with the ``dmr`` model registered.

    ``argv`` (default ``sys.argv[1:]``) are lm-eval's arguments. After lm-eval's table, each ``dmr``
    model prints the policy that ran and its FLOP line. Exit status: lm-eval's, or 2 with one line
    ``error: ...`` for an error of this library (a bad ``policy=``, an unsupported model) or a missing
    lm-eval.
    """
    global _COLLECTOR
    try:
        register()
    except MissingDependencyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate  # pyright: ignore[reportMissingImports]

    runs: list[Any] = []
    saved_argv = sys.argv
    if argv is not None:
        sys.argv = ["dmr-lm-eval", *argv]  # lm-eval's parser reads sys.argv
    _COLLECTOR = runs
    try:
        cli_evaluate()
    except DmrError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # usage errors, --help
        if exit_.code not in (0, None):
            return exit_.code if isinstance(exit_.code, int) else 2
    finally:
        sys.argv = saved_argv
        _COLLECTOR = None
    for lm in runs:
        print(lm.dmr_summary())
    sys.stdout.flush()
    return 0


if importlib.util.find_spec("lm_eval") is not None:  # the one side effect: ``--model dmr`` exists
    register()
