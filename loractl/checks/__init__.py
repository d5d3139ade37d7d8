"""``check``: a CI gate for an adapter: integrity, values, fit to a base, and what a serving runtime accepts.

Every rule is a function of a :class:`~loractl.checks.findings.Context` returning
:class:`~loractl.checks.findings.Finding` objects (a stable ``code``, a ``severity``, the module it is
about, a message and, where one exists, the ``loractl`` command line that fixes it); ``check`` runs
them in order and lists every finding, never only the first. Nothing here prints or writes; an
unreadable adapter becomes an ``integrity`` finding, not an exception.

The rules live by subject: :mod:`.adapter` (what every check asks), and one module per runtime, each
a ``RULES`` list read from that runtime's own source (cited in each rule's docstring): :mod:`.vllm`,
:mod:`.llamacpp`, :mod:`.lorax`, :mod:`.peft`. A new runtime is a new module with its ``RULES`` and a
line in :data:`RUNTIMES`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError, UsageError
from . import adapter as adapter_rules
from . import llamacpp, lorax, peft, vllm
from .findings import SEVERITIES, CheckResult, Context, Finding, Rule
from .lorax import lorax_padded_rank
from .vllm import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

__all__ = [
    "SEVERITIES",
    "TARGETS",
    "CheckResult",
    "Finding",
    "VLLM_MAX_LORA_RANKS",
    "check",
    "lorax_padded_rank",
    "vllm_max_lora_rank",
]

TARGETS = ("peft", "vllm", "llama.cpp", "lorax")
_TARGET_ALIASES = {"llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "llama_cpp": "llama.cpp"}
#: the rules of each ``--target``, run after the adapter's own
RUNTIMES: dict[str, list[Rule]] = {
    "peft": peft.RULES,
    "vllm": vllm.RULES,
    "llama.cpp": llamacpp.RULES,
    "lorax": lorax.RULES,
}


def check(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    target: str | None = None,
    max_rank: int | None = None,
    format: str | None = None,
    allow_pickle: bool = False,
    strict: bool = False,
    alpha: float | None = None,
) -> CheckResult:
    """Check an adapter and list every problem found.

    Rules, in order: the adapter reads (``integrity``, ``not-lora``); finite, non-zero factors
    (``nan-inf``, ``untrained-module``, ``all-zero``); ``max_rank`` (``rank-too-large``); with ``base``,
    each module fits the weight it resolves to, by the rule ``merge`` applies (``shape-mismatch``,
    ``unmatched-module``: :func:`loractl.plan.match`); an init that changed the base
    (``base-changing-init``); then what ``target`` accepts (``peft-*``, ``vllm-*``, ``llamacpp-*``,
    ``lorax-*``).

    Args:
        adapter: a PEFT folder, an adapter file, or a Hub reference ``org/name[@revision]``.
        base: a base model folder or file, or a Hub reference (shapes, coverage, and the
            architecture runtimes need).
        target: ``peft``, ``vllm``, ``llama.cpp`` or ``lorax``.
        max_rank: the largest rank allowed.
        format: force the adapter's format instead of detecting it.
        allow_pickle: accept pickle files.
        strict: warnings fail the check too.
        alpha: lora_alpha of an adapter that does not state it (a PEFT adapter without its config);
            repeated in the fix command lines.

    Returns:
        The findings; ``ok`` is False when any is an error (or, with ``strict``, a warning).

    Raises:
        UsageError: an unknown target or format, ``max_rank`` below 1.
        InputError: the adapter path does not exist, the Hub reference cannot be resolved, or the
            base cannot be opened (these are input errors, not findings: there is nothing to check).
    """
    from ..inputs import read_options
    from ..io.base import open_base
    from ..io.hub import is_hub_ref, resolve_adapter

    tgt = _target(target)
    if max_rank is not None and max_rank < 1:
        raise UsageError(f"--max-rank {max_rank} must be at least 1")
    local = resolve_adapter(adapter) if is_hub_ref(adapter) else Path(adapter)
    if not local.exists():
        raise InputError(f"{adapter}: no such file or folder", hint="check the adapter path")
    findings: list[Finding] = []
    b = open_base(base) if base is not None else None
    try:
        opts = read_options(base=b, allow_pickle=allow_pickle, alpha=alpha)
        a = adapter_rules.load(local, format, opts, findings)
        if a is not None:
            ctx = Context(str(adapter), a, b, str(base) if base is not None else None, alpha)
            for rule in _rules(tgt, max_rank, with_base=b is not None):
                findings.extend(rule(ctx))
    finally:
        if b is not None:
            b.close()
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings.sort(key=lambda f: order[f.severity])  # stable: rule order kept within a severity
    result = CheckResult(ok=True, adapter=str(adapter), target=tgt, findings=findings, strict=strict)
    result.ok = not result.failures
    return result


def _rules(target: str | None, max_rank: int | None, with_base: bool) -> list[Rule]:
    """The rules to run, in order."""
    rules: list[Rule] = [adapter_rules.nonfinite, adapter_rules.untrained]
    if max_rank is not None:
        rules.append(lambda ctx: adapter_rules.max_rank(ctx, max_rank))
    if with_base:
        rules.append(adapter_rules.fit)
    rules.append(adapter_rules.init)
    if target is not None:
        rules += RUNTIMES[target]
    return rules


def _target(target: str | None) -> str | None:
    if target is None:
        return None
    t = _TARGET_ALIASES.get(target.lower(), target.lower())
    if t not in TARGETS:
        raise UsageError(f"unknown --target {target!r}; one of {', '.join(TARGETS)}")
    return t
