"""LoRA adapters kept loaded in one module (the text encoder, or one UNet), switched per request.

A request names its LoRAs with weights (``loras``). Each stage loads only its own keys of a LoRA file with
diffusers' loaders on the bare module (``load_lora_into_text_encoder`` / ``load_lora_into_unet``: the same
code ``pipe.load_lora_weights`` runs), keeps up to ``capacity`` adapters loaded (least recently used out
first), and switches between requests with ``set_adapters`` (PEFT scales), never by fusing weights. The
module is only touched on the stage's model thread.

A LoRA file with no keys for this module is loaded as nothing (a UNet-only LoRA in the text encoder). One
whose keys or shapes do not fit the module is refused with 422 and leaves the module as it was.

Requests with *different* LoRA sets can share one forward (``rows``): the module runs with its adapters
disabled, and a hook on every LoRA layer adds each row group's own LoRAs (``lora_B(lora_A(x[rows])) * scale
* weight``) to that group's rows of the base output. This is PEFT's mixed-batch forward (``adapter_names`` per
row) generalised from one adapter per row to a weighted *set* per row, which PEFT cannot express: its
per-adapter ``scaling`` is shared by every row. The arithmetic is PEFT's own, on a row slice, so a request in a
mixed batch is within rounding (2/255) of itself alone; a forward whose rows all carry one set takes the plain
``set_adapters`` path instead.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
from diffusers.utils.peft_utils import delete_adapter_layers, set_adapter_layers, set_weights_and_activate_adapters
from peft.tuners.lora import LoraLayer

from shared.errors import InvalidValue
from shared.serving.adapters import AdapterRoot

log = logging.getLogger("triptych.loras")

Component = Literal["unet", "text_encoder"]
#: A request's LoRAs as the batchers compare them: ((name, weight), ...) in request order.
LoraSet = tuple[tuple[str, float], ...]


#: Reads and converts LoRA files off the model threads (``LoraStore.prefetch``), for every store.
_READER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-reader")


@dataclass
class _Read:
    tensors: dict[str, torch.Tensor]  # this module's keys only
    alphas: Any
    fingerprint: str


@dataclass
class _Loaded:
    adapter: str | None  # PEFT adapter name in the module; None: the file has nothing for this module
    fingerprint: str
    parameters: int
    mixable: bool  # plain LoRA layers only: DoRA and other PEFT variants cannot take the row-grouped forward


class LoraStore:
    """The LoRAs loaded into ``module`` and the set currently active in it."""

    def __init__(self, root: AdapterRoot, module: Any, component: Component, *, capacity: int) -> None:
        self.root = root
        self.module = module
        self.component = component
        self.capacity = capacity
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        # () = none active; ((adapter, weight), ...) = that set via set_adapters; ("rows", adapters) = the row
        # hooks of ``rows`` with those adapters at unit scale; None = unknown.
        self._active: tuple[Any, ...] | None = ()
        self._counter = 0
        self._hooks: list[Any] = []
        self._fused: dict[int, _RowLoras] = {}  # per LoRA layer (id), for the plan ``_fused_key``
        self._fused_key: tuple[Any, ...] | None = None
        self._staged: dict[str, Future[_Read]] = {}  # LoRAs being (or already) read by ``prefetch``
        self._staged_lock = threading.Lock()

    # ------------------------------------------------------------------ on any thread
    def check(self, loras: LoraSet, on_ready: Callable[[], None] | None = None) -> None:
        """Before queueing: every name resolves to a file with a valid header (404 / 422 otherwise). A LoRA not
        loaded yet is then read and converted on a reader thread (``prefetch``), so the model thread, which
        goes on stepping other requests meanwhile, only injects it (``on_ready`` is called when it is read)."""
        for name, _ in loras:
            if name not in self._loaded:
                self.root.resolve(name).tensors()
        self.prefetch(loras, on_ready)

    def prefetch(self, loras: LoraSet, on_ready: Callable[[], None] | None = None) -> None:
        """Start reading the LoRAs of ``loras`` that are neither loaded nor being read (any thread)."""
        for name, _ in loras:
            with self._staged_lock:
                if name in self._loaded or name in self._staged:
                    continue
                future = _READER.submit(self._read, name)
                self._staged[name] = future
                # A read nobody took (its request went away) is dropped once there are too many.
                while len(self._staged) > 2 * self.capacity:
                    oldest = next(iter(self._staged))
                    if not self._staged[oldest].done():
                        break
                    del self._staged[oldest]
            if on_ready is not None:
                future.add_done_callback(lambda _: on_ready())

    def ready(self, loras: LoraSet) -> bool:
        """Whether ``load(loras)`` would not wait for a reader thread (any thread)."""
        with self._staged_lock:
            return all(name in self._loaded or self._staged.get(name) is None or self._staged[name].done()
                       for name, _ in loras)  # fmt: skip

    @property
    def loaded(self) -> int:
        return len(self._loaded)

    @property
    def parameter_bytes(self) -> int:
        return sum(entry.parameters for entry in self._loaded.values()) * 4

    def mixable(self, loras: LoraSet) -> bool:
        """Whether ``loras`` (loaded) can share a forward with other sets through ``rows``."""
        return all(self._loaded[name].mixable for name, _ in loras)

    def fingerprints(self, loras: LoraSet) -> tuple[str, ...]:
        """The loaded files' fingerprints, for cache keys (call after ``activate``)."""
        return tuple(self._loaded[name].fingerprint for name, _ in loras)

    # ------------------------------------------------------------------ on the model thread
    def activate(self, loras: LoraSet) -> None:
        """Make exactly ``loras`` (with their weights) active; load the ones not loaded yet."""
        self.load(loras)
        wanted = tuple((self._loaded[n].adapter, w) for n, w in loras if self._loaded[n].adapter is not None)
        if wanted == self._active:
            return
        self._remove_hooks()
        self._active = None  # a failure below leaves the state unknown: set it again next time
        if wanted:
            names, weights = [a for a, _ in wanted], [w for _, w in wanted]
            if self.component == "unet":
                self.module.set_adapters(names, weights)
                self.module.enable_lora()
            else:
                set_weights_and_activate_adapters(self.module, names, weights)
                set_adapter_layers(self.module, enabled=True)
        elif self._loaded_any():
            if self.component == "unet":
                self.module.disable_lora()
            else:
                set_adapter_layers(self.module, enabled=False)
        self._active = tuple((str(a), w) for a, w in wanted)

    def load(self, loras: LoraSet, *, keep: frozenset[str] = frozenset()) -> None:
        """Load the LoRAs of ``loras`` not loaded yet; evictions spare ``keep`` and ``loras`` themselves."""
        keep = keep | {name for name, _ in loras}
        for name, _ in loras:
            self._ensure(name, keep)

    @contextmanager
    def rows(self, groups: Sequence[tuple[int, LoraSet]]) -> Iterator[None]:
        """Within the block, one forward of the module serves consecutive row groups, each ``(rows, loras)``
        under its own LoRA set (see the module docstring). Every LoRA named must fit the cache at once; one
        that does not load fails the whole forward."""
        every = frozenset(name for _, loras in groups for name, _ in loras)
        for _, loras in groups:
            self.load(loras, keep=every)
        if not all(self.mixable(loras) for _, loras in groups):
            raise RuntimeError("LoRA rows: a DoRA (or other PEFT variant) LoRA cannot share a forward")
        plan: list[tuple[int, int, tuple[tuple[str, float], ...]]] = []
        start = 0
        for count, loras in groups:
            adapters = tuple((str(self._loaded[n].adapter), w) for n, w in loras if self._loaded[n].adapter)
            plan.append((start, start + count, adapters))
            start += count
        used = tuple(sorted({adapter for *_, adapters in plan for adapter, _ in adapters}))
        if not used:  # no group has a LoRA for this module: the base forward
            self.activate(())
            yield
            return
        if self._active != ("rows", used):
            # Unit scales (the request weights go in per row), the base path in every LoRA layer, and the hooks
            # that add each row's LoRAs; they stay until a forward takes the plain path again (``activate``).
            self._remove_hooks()
            set_weights_and_activate_adapters(self.module, list(used), [1.0] * len(used))
            set_adapter_layers(self.module, enabled=False)
            self._hooks = [layer.register_forward_hook(self._add_rows) for layer in self._layers()]
            self._active = ("rows", used)
            self._fused.clear()
        key = tuple(plan)
        if key != self._fused_key:
            self._fused = {id(layer): _RowLoras.build(layer, used, plan, start) for layer in self._layers()}
            self._fused_key = key
        yield

    def _add_rows(self, layer: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        fused = self._fused.get(id(layer))
        if fused is None:  # a forward outside ``rows`` (cannot happen: ``activate`` removes the hooks first)
            raise RuntimeError("LoRA rows: a hooked layer ran outside a rows() forward")
        return fused.add(layer, args[0], output)

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._fused.clear()
        self._fused_key = None

    def _layers(self) -> list[torch.nn.Module]:
        return [m for m in self.module.modules() if isinstance(m, LoraLayer) and isinstance(m, torch.nn.Module)]

    def _loaded_any(self) -> bool:
        return any(entry.adapter is not None for entry in self._loaded.values())

    def _ensure(self, name: str, keep: frozenset[str] = frozenset()) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        with self._staged_lock:
            future = self._staged.pop(name, None)
        read = future.result() if future is not None else self._read(name)
        mine, alphas = read.tensors, read.alphas
        # Not under inference_mode (the batchers run in it): parameters made there lose requires_grad, and that
        # alone changes which CPU kernels run, versus pipe.load_lora_weights (docs/architecture.md).
        with torch.inference_mode(False):
            self._make_room(keep)
            adapter = None
            if mine:
                self._counter += 1
                adapter = f"triptych_lora_{self._counter}"
                try:
                    with warnings.catch_warnings():
                        # PEFT warns on every adapter after the first; several loaded at once is the point here.
                        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                        if self.component == "unet":
                            Loader.load_lora_into_unet(mine, alphas, self.module, adapter_name=adapter)
                        else:
                            Loader.load_lora_into_text_encoder(mine, alphas, self.module, adapter_name=adapter)
                except (RuntimeError, ValueError, KeyError) as exc:
                    self._delete(adapter)
                    raise self._refused(name, exc) from None
        fingerprint = read.fingerprint
        mixable = adapter is None or not any(adapter in getattr(m, "lora_variant", {}) for m in self._layers())
        self._loaded[name] = _Loaded(adapter, fingerprint, sum(v.numel() for v in mine.values()), mixable)
        self._active = None
        log.info("LoRA %r loaded into the %s (%d tensors)", name, self.component, len(mine))

    def _read(self, name: str) -> _Read:
        """The file's tensors for this module, converted to diffusers keys by diffusers' ``lora_state_dict``
        (kohya/A1111 included), and its fingerprint: everything of a load but the injection."""
        file = self.root.resolve(name)
        file.tensors()  # the header, checked by hand before safetensors parses the file
        fingerprint = file.fingerprint()
        with torch.inference_mode(False):
            try:
                state, alphas = Loader.lora_state_dict(str(file.path))
            except (RuntimeError, ValueError, KeyError) as exc:
                raise self._refused(name, exc) from None
        mine = {k: v for k, v in state.items() if k.startswith(f"{self.component}.")}
        return _Read(mine, alphas, fingerprint)

    def _refused(self, name: str, exc: Exception) -> InvalidValue:
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
        where = self.component.replace("_", " ")
        return InvalidValue(f"LoRA {name!r} does not fit this model's {where}: {reason}", param="loras")

    def _make_room(self, keep: frozenset[str]) -> None:
        """Unload least recently used LoRAs down to ``capacity`` - 1, sparing ``keep`` (the ones the current
        forward needs: the cache may exceed its bound for as long as that forward needs more)."""
        spare = [n for n in self._loaded if n not in keep]
        while len(self._loaded) >= self.capacity and spare:
            old_name = spare.pop(0)
            old = self._loaded.pop(old_name)
            if old.adapter is not None:
                self._delete(old.adapter)
            log.info("LoRA %r unloaded from the %s (cache of %d)", old_name, self.component, self.capacity)

    def _delete(self, adapter: str) -> None:
        if adapter in (getattr(self.module, "peft_config", None) or {}):
            if self.component == "unet":
                self.module.delete_adapters(adapter)
            else:
                delete_adapter_layers(self.module, adapter)
        self._active = None


@dataclass
class _RowLoras:
    """One LoRA layer's part in a ``rows`` forward: its adapters fused into one ``lora_A`` (ranks stacked) and
    one ``lora_B``, and per row the scale of each rank (the LoRA's ``alpha / r`` × the row's weight, 0 for a
    LoRA the row does not use). Then ``out += B(A(x) * scale)`` adds every row's own set in three ops,
    however many groups the batch has. Layers other than plain Linear / Conv2d LoRAs (a bias, grouped conv)
    take the per-group path (``groups``)."""

    total: int
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    conv: dict[str, Any] | None = None
    groups: list[tuple[int, int, tuple[tuple[str, float], ...]]] | None = None

    @classmethod
    def build(cls, layer: Any, used: tuple[str, ...], plan: list[Any], total: int) -> _RowLoras:
        present = [adapter for adapter in used if adapter in layer.lora_A]
        if not present:
            return cls(total)
        downs = [layer.lora_A[adapter] for adapter in present]
        ups = [layer.lora_B[adapter] for adapter in present]
        modules = downs + ups
        linear = all(type(m) is torch.nn.Linear for m in modules)
        conv = (
            all(type(m) is torch.nn.Conv2d and m.groups == 1 for m in modules)
            and len({(m.stride, m.padding, m.dilation) for m in downs}) == 1
        )
        if not (linear or conv) or any(m.bias is not None for m in modules):
            return cls(total, groups=plan)
        ranks = [m.weight.shape[0] for m in downs]
        first = downs[0].weight
        scale = torch.zeros(total, sum(ranks), dtype=first.dtype, device=first.device)
        for lo, hi, adapters in plan:
            for adapter, weight in adapters:
                if adapter in present:
                    i = present.index(adapter)
                    scale[lo:hi, sum(ranks[:i]) : sum(ranks[: i + 1])] = layer.scaling[adapter] * weight
        down, up = downs[0], torch.cat([m.weight for m in ups], dim=1)
        a = torch.cat([m.weight for m in downs])
        geometry = {"stride": down.stride, "padding": down.padding, "dilation": down.dilation} if conv else None
        return cls(total, a=a, b=up, scale=scale, conv=geometry)

    def add(self, layer: Any, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.total or out.shape[0] != self.total:
            raise RuntimeError(f"LoRA rows: a layer saw batch {x.shape[0]}, the plan has {self.total} rows")
        if self.groups is not None:
            for lo, hi, adapters in self.groups:
                for adapter, weight in adapters:
                    if adapter in layer.lora_A:
                        down, up = layer.lora_A[adapter], layer.lora_B[adapter]
                        part = layer.lora_dropout[adapter](x[lo:hi].to(down.weight.dtype))
                        out[lo:hi] += (up(down(part)) * (layer.scaling[adapter] * weight)).to(out.dtype)
            return out
        if self.a is None or self.b is None or self.scale is None:
            return out
        x = x.to(self.a.dtype)
        if self.conv is not None:
            h = torch.nn.functional.conv2d(x, self.a, None, **self.conv) * self.scale[:, :, None, None]
            delta = torch.nn.functional.conv2d(h, self.b)
        else:
            h = torch.nn.functional.linear(x, self.a)
            delta = torch.nn.functional.linear(h * self.scale.view(self.total, *[1] * (h.dim() - 2), -1), self.b)
        out += delta.to(out.dtype)
        return out


def lora_set(loras: Sequence[Any] | None) -> LoraSet:
    """A request's ``loras`` ([{name, weight}] models) as a hashable set key."""
    return tuple((lora.name, float(lora.weight)) for lora in loras or ())
