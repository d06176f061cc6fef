"""The scheduler catalogue: diffusers class names, the A1111 sampler names users know, and fresh instances.

A request's ``scheduler`` is either a diffusers class name, matched exactly (``"EulerDiscreteScheduler"``), or an
A1111 sampler name, matched ignoring case and runs of spaces (``"dpm++ 2m  karras"``). Every name resolves to a
class and the config overrides it implies; the instance is built from the model's own scheduler config with
those overrides on top, fresh for every request (schedulers hold per-run state).

API (pure functions over the model's compatible class names, so the UNet stage and central can both use them)::

    usable_compatibles(default_class_name, base_config) -> ["DDIMScheduler", ...]   # what /v1/info lists
    resolve(name, compatible)          -> ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, ...})
    build(name, compatible, base_config, seeds) -> a new scheduler instance (name None/"": the model's own)
    catalogue(compatible, base_config=None)     -> the body of ``GET /v1/schedulers`` (SPEC §4)
    valid_names(compatible)            -> every name ``resolve`` accepts, classes first

Unknown names, and names whose class the model is not compatible with, raise
``InvalidValue(param="scheduler")`` (422) whose message lists the valid names.

``catalogue`` JSON shape, one entry per compatible class, in the order of ``compatible``::

    {
      "name": "DPMSolverMultistepScheduler",      # diffusers class name
      "stochastic": false,                        # the class as configured by the model, no overrides
      "aliases": ["DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ 2M SDE Karras"],
      "options": {                                # one key per alias, in the same order
        "DPM++ 2M":        {"config": {"algorithm_type": "dpmsolver++", "use_karras_sigmas": false},
                            "stochastic": false},
        "DPM++ 2M Karras": {"config": {"algorithm_type": "dpmsolver++", "use_karras_sigmas": true},
                            "stochastic": false},
        "DPM++ 2M SDE":    {"config": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": false},
                            "stochastic": true},
        ...
      }
    }

``config`` is exactly what is passed to ``from_config`` on top of the model's scheduler config. It holds the
option diffusers documents for the alias *and* the class default for every key a sibling alias sets, so
"DPM++ 2M" is not Karras even on a model whose own config turns Karras sigmas on. ``stochastic`` says the
sampler injects fresh noise at each step (ancestral and SDE samplers, DDPM); those draw it from the request's
generators (or, for ``DPMSolverSDEScheduler``, a Brownian tree seeded with the request's per-image seeds), so
seeded results stay reproducible. ``DDIMScheduler`` is listed as not stochastic: it is only with ``eta > 0``,
which is a request field, not a scheduler option. Without ``base_config`` the class-level ``stochastic`` is
judged from the class alone (e.g. central, which only knows the class names).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidValue

__all__ = [
    "ALIASES",
    "Alias",
    "build",
    "catalogue",
    "is_stochastic",
    "resolve",
    "usable_compatibles",
    "valid_names",
]


@dataclass(frozen=True)
class Alias:
    """An A1111 sampler name: the diffusers class it maps to and the config overrides it implies."""

    name: str
    cls: str
    config: Mapping[str, Any] = field(default_factory=dict)


_K = "use_karras_sigmas"
_ALGO = "algorithm_type"

# A1111 / k-diffusion sampler names -> diffusers, following the table "A1111/k-diffusion | Diffusers | Usage" in
# diffusers' scheduler overview (docs/source/en/api/schedulers/overview.md,
# https://huggingface.co/docs/diffusers/api/schedulers/overview). Each entry carries the documented "init with"
# option; the other keys are the class's own defaults, set explicitly so sibling aliases stay distinct whatever
# the model's scheduler config says (see the module docstring).
#
# Deliberately left out, as the table has no diffusers equivalent ("N/A") for them:
#   "DPM++ 2S a", "DPM++ 2S a Karras" (only "very similar to DPMSolverSinglestepScheduler"), "DPM adaptive",
#   "DPM fast". Also A1111's newer "DPM++ 3M SDE", "DPM++ 2M SDE Heun", "Restart", "LCM", which the table omits.
#
# Note: the table maps "DPM++ SDE" to DPMSolverSinglestepScheduler (a deterministic solver), not to
# DPMSolverSDEScheduler (the port of k-diffusion's stochastic sample_dpmpp_sde). We follow the documentation;
# DPMSolverSDEScheduler stays available under its class name.
_DOCUMENTED: tuple[Alias, ...] = (
    Alias("DPM++ 2M", "DPMSolverMultistepScheduler", {_ALGO: "dpmsolver++", _K: False}),
    Alias("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {_ALGO: "dpmsolver++", _K: True}),
    Alias("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {_ALGO: "sde-dpmsolver++", _K: False}),
    Alias("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", {_ALGO: "sde-dpmsolver++", _K: True}),
    Alias("DPM++ SDE", "DPMSolverSinglestepScheduler", {_K: False}),
    Alias("DPM++ SDE Karras", "DPMSolverSinglestepScheduler", {_K: True}),
    Alias("DPM2", "KDPM2DiscreteScheduler", {_K: False}),
    Alias("DPM2 Karras", "KDPM2DiscreteScheduler", {_K: True}),
    Alias("DPM2 a", "KDPM2AncestralDiscreteScheduler", {_K: False}),
    Alias("DPM2 a Karras", "KDPM2AncestralDiscreteScheduler", {_K: True}),
    Alias("Euler", "EulerDiscreteScheduler"),
    Alias("Euler a", "EulerAncestralDiscreteScheduler"),
    Alias("Heun", "HeunDiscreteScheduler"),
    Alias("LMS", "LMSDiscreteScheduler", {_K: False}),
    Alias("LMS Karras", "LMSDiscreteScheduler", {_K: True}),
)

# A1111 samplers the table does not list, mapped by us (not by the diffusers docs):
#   DDIM  -> DDIMScheduler (A1111's DDIM comes from the same LDM code; eta is the request's `eta`);
#   PLMS  -> PNDMScheduler without the Runge-Kutta warm-up (skip_prk_steps=True), as LDM's PLMS sampler runs and
#            as SD 1.x ships its own scheduler config;
#   UniPC -> UniPCMultistepScheduler with diffusers' defaults (A1111's UniPC defaults to the bh1 variant and
#            order 3; we keep diffusers' bh2 / order 2, the table lists UniPC only on the diffusers side);
#   DEIS  -> DEISMultistepScheduler (not an A1111 name; ComfyUI's "deis"; a convenience).
_OURS: tuple[Alias, ...] = (
    Alias("DDIM", "DDIMScheduler"),
    Alias("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    Alias("UniPC", "UniPCMultistepScheduler"),
    Alias("DEIS", "DEISMultistepScheduler"),
)

ALIASES: tuple[Alias, ...] = _DOCUMENTED + _OURS

# Samplers that add fresh noise at every step, whatever their config (besides `algorithm_type="sde-..."`).
_STOCHASTIC_CLASSES = frozenset(
    {
        "EulerAncestralDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverSDEScheduler",
        "DDPMScheduler",
        "DDPMParallelScheduler",
        "LCMScheduler",
        "TCDScheduler",
        "CMStochasticIterativeScheduler",
    }
)


def _norm(name: str) -> str:
    return " ".join(name.split()).casefold()


_BY_NORM: dict[str, Alias] = {_norm(a.name): a for a in ALIASES}
assert len(_BY_NORM) == len(ALIASES), "two aliases normalise to the same name"


def is_stochastic(cls: str, config: Mapping[str, Any] | None = None) -> bool:
    """Whether class ``cls`` with ``config`` (overrides on top of the model's config) injects noise per step."""
    algo = str((config or {}).get(_ALGO, ""))
    return cls in _STOCHASTIC_CLASSES or algo.startswith("sde-")


def _aliases_of(cls: str) -> list[Alias]:
    return [a for a in ALIASES if a.cls == cls]


def valid_names(compatible: Iterable[str]) -> list[str]:
    """Every name ``resolve`` accepts for this model: the class names, then the aliases of compatible classes."""
    classes = list(compatible)
    allowed = set(classes)
    return classes + [a.name for a in ALIASES if a.cls in allowed]


def _invalid(message: str, compatible: list[str]) -> InvalidValue:
    allowed = set(compatible)
    aliases = [a.name for a in ALIASES if a.cls in allowed]
    return InvalidValue(
        f"{message}; choose a diffusers class name ({', '.join(compatible)}) "
        f"or an A1111 sampler name ({', '.join(aliases) or 'none for this model'})",
        param="scheduler",
    )


def resolve(name: str, compatible: list[str]) -> tuple[str, dict[str, Any]]:
    """``name`` (class name, exact; or A1111 alias, case- and space-insensitive) -> (class name, overrides).

    The overrides are a fresh dict (callers may change it). Raises ``InvalidValue(param="scheduler")`` for unknown
    names and for names whose class is not in ``compatible``.
    """
    compatible = list(compatible)
    if not isinstance(name, str):
        raise _invalid(f"`scheduler` must be a string, got {type(name).__name__}", compatible)
    if name in compatible:
        return name, {}
    alias = _BY_NORM.get(_norm(name))
    if alias is not None:
        if alias.cls not in compatible:
            raise _invalid(
                f"`scheduler` {name!r} ({alias.cls}) is not compatible with this model's scheduler", compatible
            )
        return alias.cls, dict(alias.config)
    hint = next((c for c in compatible if c.casefold() == name.strip().casefold()), None)
    if hint is not None:
        message = f"`scheduler` {name!r} is not a known scheduler (class names are case-sensitive: {hint!r}?)"
    elif _is_diffusers_scheduler(name):
        message = f"`scheduler` {name!r} is not compatible with this model's scheduler"
    else:
        message = f"`scheduler` {name!r} is not a known scheduler"
    raise _invalid(message, compatible)


def _is_diffusers_scheduler(name: str) -> bool:
    import diffusers

    return name.isidentifier() and name.endswith("Scheduler") and hasattr(diffusers, name)


def build(
    name: str | None,
    compatible: list[str],
    base_config: Mapping[str, Any],
    seeds: list[int] | None = None,
) -> Any:
    """A new scheduler for ``name`` (None or "": the model's own class, ``base_config["_class_name"]``).

    ``getattr(diffusers, cls).from_config(base_config, **overrides)``. Schedulers that draw Brownian noise from
    a seed of their own (``noise_sampler_seed``, i.e. ``DPMSolverSDEScheduler``) get ``seeds``, one per image,
    so their results are reproducible too; the others take their noise from the generators the loop passes to
    ``step``.
    """
    import diffusers

    if not name:
        if "_class_name" not in base_config:
            raise ValueError("build(None, ...) needs `_class_name` in base_config (as load_config returns it)")
        name = str(base_config["_class_name"])
    cls_name, overrides = resolve(name, compatible)
    cls = getattr(diffusers, cls_name)
    if seeds is not None and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        overrides["noise_sampler_seed"] = list(seeds)
    try:
        return cls.from_config(dict(base_config), **overrides)
    except ValueError as exc:  # e.g. Karras sigmas on a model configured with exponential or beta sigmas
        raise InvalidValue(
            f"`scheduler` {name!r} cannot be built on this model's scheduler config: {exc}", param="scheduler"
        ) from None


def catalogue(compatible: list[str], base_config: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The ``GET /v1/schedulers`` body: one JSON-ready entry per compatible class (shape in the module docstring).

    ``base_config`` (the model's scheduler config) only refines the class-level ``stochastic`` flag.
    """
    entries = []
    for cls in compatible:
        aliases = _aliases_of(cls)
        entries.append(
            {
                "name": cls,
                "stochastic": is_stochastic(cls, base_config),
                "aliases": [a.name for a in aliases],
                "options": {
                    a.name: {
                        "config": dict(a.config),
                        "stochastic": is_stochastic(cls, {**(base_config or {}), **a.config}),
                    }
                    for a in aliases
                },
            }
        )
    return entries


def usable_compatibles(default_class_name: str, base_config: Mapping[str, Any]) -> list[str]:
    """The model's scheduler class and every diffusers scheduler it declares compatible, sorted.

    diffusers exports placeholder ("dummy") classes for schedulers whose optional backend is missing (e.g.
    ``DPMSolverSDEScheduler`` without ``torchsde``); those are left out.
    """
    import diffusers

    base = getattr(diffusers, default_class_name).from_config(dict(base_config))
    usable = {c.__name__ for c in base.compatibles if "dummy" not in c.__module__}
    return sorted({default_class_name} | usable)
