"""Training-acceleration methods as plug-ins: the interface, the registry and the set of methods a run uses.

A method (Token Expansion, the Patch Sampling Schedule, Tri-Level E-ViT, ...) is a package with a ``method.py`` that
defines one :class:`Method` subclass and registers it under the name of its config section::

    @register_method
    class MyMethod(Method):
        name = "mine"                   # the config section `mine:` and the prefix of its log fields
        label = "Mine"
        Config = MineConfig             # a dataclass: the section's keys, types and defaults

The engine and the entrypoint only ever talk to a :class:`MethodSet` at a handful of typed points (the nearest
anchor is MosaicML Composer's algorithms and events, kept smaller): build the model (``patch``), follow the training
clock (``on_epoch`` / ``on_step``), change the recipe per epoch (``recipe``: input size, batch, RandAugment; the
trainer rebuilds the loaders and resizes the model), choose and observe training examples (``train_indices`` /
``observe``), report (``epoch_fields`` / ``step_fields`` / ``progress`` / ``summary``), checkpoint (``state_dict``), evaluate
(``eval_variants``) and be measured (``variants`` / ``op_modules`` / ``inference_knob``). Every hook has a do-nothing default, so a method
implements only what it changes. Packages beside this file that hold a ``method.py`` are imported on first use of
the registry: a new method needs its package and a config, nothing else.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

ROOT = os.path.dirname(os.path.abspath(__file__))


class MethodError(ValueError):
    """A method's section or combination is impossible; ``str(err)`` is the one line shown to the user."""


# ---------------------------------------------------------------------------------------------- what hooks receive
@dataclass(frozen=True)
class Clock:
    """Where training is: the epoch, the iteration inside it, and the global iteration counter.

    ``global_step`` counts optimizer-loop iterations since the start of training (saved in checkpoints, so a resumed
    run continues the exact counter); per-iteration schedules read it before the iteration trains, as DeiT does.
    """
    epoch: int
    step: int
    global_step: int
    iters_per_epoch: int
    epochs: int


@dataclass(frozen=True)
class TokenSite:
    """Where a method changes the token list, on the block axis of :mod:`models.tokens` (``b``: input of block
    ``b``; ``b + 0.5``: inside block ``b``), and whether it needs the full patch grid at its input."""
    site: float
    needs_full_grid: bool = False
    what: str = ""


@dataclass
class Variant:
    """One state of a method to measure: FLOPs are counted and steps timed with the model in this state.

    ``share``: the fraction of all training images that go through the model in this state (the shares of one
    method sum to 1); ``apply(model)`` puts a model in this state with the method's operator on also in eval mode.
    """
    label: str
    share: float
    apply: Callable[[nn.Module], None]
    patch_tokens: Optional[int] = None
    epochs: Optional[Tuple[int, int]] = None      # [first, last) when the state is a span of epochs
    # per epoch, the fraction of that epoch's iterations in this state (default: from `epochs`, else `share`)
    epoch_shares: Optional[Sequence[float]] = None
    input_size: Optional[int] = None              # the image size of this state (None: the config's input_size)

    def share_in_epoch(self, epoch: int) -> float:
        if self.epoch_shares is not None:
            return float(self.epoch_shares[epoch])
        if self.epochs is not None:
            return 1.0 if self.epochs[0] <= epoch < self.epochs[1] else 0.0
        return self.share


@dataclass(frozen=True)
class Recipe:
    """What a method changes in the training recipe for one epoch; ``None`` keeps the config's value.

    The trainer applies it at the epoch's start: a new ``batch_size``, ``grad_accum_steps`` or ``aa`` rebuilds the
    training loader (in the same process); a new ``input_size`` resizes the model (its absolute position embedding
    and that parameter's optimizer moments follow, see :func:`models.resize.set_input_size`) and the loader's images
    are brought to that size by :meth:`Method.resize_images`; ``eval_size`` is the size evaluation runs at.
    """
    batch_size: Optional[int] = None          # per process
    grad_accum_steps: Optional[int] = None
    aa: Optional[str] = None                  # timm RandAugment / auto-augment policy string
    input_size: Optional[int] = None
    eval_size: Optional[int] = None

    def merged(self, other: "Recipe", names: Tuple[str, str]) -> "Recipe":
        """This recipe with ``other``'s settings added; two methods may not set the same field."""
        out = {}
        for f in self.__dataclass_fields__:
            a, b = getattr(self, f), getattr(other, f)
            if a is not None and b is not None and a != b:
                raise MethodError(f"methods: {names[0]} and {names[1]} both set the recipe's {f} ({a} / {b}); use one")
            out[f] = a if a is not None else b
        return Recipe(**out)


@dataclass
class InferenceKnob:
    """An inference-time setting a method makes sweepable (PSS: the patch keep rate), for ``scripts/sweep.py``."""
    name: str
    values: Sequence[float]
    apply: Callable[[nn.Module, float], None]
    default: float = 1.0


@dataclass
class ExampleBatch:
    """What a training step saw, per example, for methods that select examples (Tri-Level).

    ``indices``: dataset indices; ``logits``: class logits (detached); ``labels``: the true classes before
    mixup/cutmix; ``targets``: what the loss saw (the same labels, or mixed soft targets ``[B, K]``).
    """
    indices: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    targets: Any


@dataclass
class PublishedRow:
    """One published table row, as data; ``None`` is a cell that was not recovered (shown as such, never guessed).

    Rows live in their method's package (``<package>/published.py``, a list ``ROWS``) and are found through the
    registry (:meth:`Method.published_rows`, :func:`published_rows`). A run matches a row when it names it in its
    ``reproduces`` key, or by its model (unless the row's model is unknown), its active methods and every
    ``settings`` value of the row.
    """
    paper: str                                   # the paper (or README, or other source) the figures come from
    table: str                                   # where in it: "Tab. 1", "README", "Fig. 1", "abstract"
    row: str                                     # the row's label, unique within its paper
    model: Optional[str]                         # the timm model this repository trains for it (None: not recovered)
    method: str                                  # the method / setting as published ("baseline", "EViT/0.9", ...)
    methods: Optional[Tuple[str, ...]] = ()      # the active sections of a matching run (None: no run here can)
    settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # section -> key -> value to match
    top1: Optional[float] = None                 # ImageNet top-1 (%) as the paper states it
    top1_final: Optional[float] = None           # last-epoch top-1, where a log gives it
    top1_best: Optional[float] = None            # best-epoch top-1, where a log gives it
    train_time: Optional[float] = None           # training time in ``time_unit``
    time_unit: str = ""                          # "h" (wall-clock on ``gpus``) or "% of baseline"
    gpus: Optional[str] = None                   # the hardware the time was measured on
    gflops: Optional[float] = None               # inference GFLOPs per image as published
    speedup: Optional[float] = None              # training speed-up over the row's baseline (x)
    source: str = ""                             # where the figures were read
    precision: str = ""                          # how exact they are (read / vector figure / raster figure)
    kind: str = "table"                          # table: the paper's own cell; context: another source's figure
    notes: str = ""
    sweep: Mapping[str, Mapping[float, Optional[float]]] = field(default_factory=dict)   # e.g. top-1 per keep rate


# ---------------------------------------------------------------------------------------------- the interface
class Method:
    """Base class of a method plug-in. ``section`` is the validated config section, ``cfg`` the whole run config."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    Config: ClassVar[type]
    per_step: ClassVar[bool] = False              # on_step() runs every iteration (else only on_epoch())
    observes_examples: ClassVar[bool] = False     # observe() gets every training batch's per-example outputs

    def __init__(self, section: Any, cfg: Any):
        self.section, self.cfg = section, cfg
        self.models: List[nn.Module] = []

    # --- configuration ------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, section: Any, cfg: Any) -> None:
        """Check the section against itself and the run config; raise :class:`MethodError` naming the key."""

    def token_site(self) -> Optional[TokenSite]:
        """Where this method changes the token count (``None``: it does not)."""
        return None

    # --- the model ----------------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        """Change the live model built by the factory (hooks, module swaps); raise MethodError if it cannot."""

    def attach(self, models: Sequence[nn.Module]) -> None:
        """Every model of the run that carries the patch (the trained one, its EMA copy), once, before training."""
        self.models = list(models)

    # --- the clock ----------------------------------------------------------------------------------------
    def on_epoch(self, clock: Clock) -> None:
        """Start of an epoch (also on resume)."""

    def on_step(self, clock: Clock) -> None:
        """Before every training iteration, when ``per_step`` is set."""

    # --- the recipe and the data -------------------------------------------------------------------------
    def recipe(self, epoch: int) -> Recipe:
        """The recipe settings this method imposes in ``epoch`` (default: none)."""
        return Recipe()

    def resize_images(self, images: torch.Tensor, size: int) -> Optional[torch.Tensor]:
        """A batch brought to ``size`` px, for a method whose recipe changes ``input_size`` (``None``: not mine)."""
        return None

    def train_indices(self, epoch: int, dataset_len: int) -> Optional[Sequence[int]]:
        """Dataset indices to train on this epoch (``None``: all)."""
        return None

    def observe(self, batch: ExampleBatch) -> None:
        """Per-example outputs of a training step, when ``observes_examples`` is set."""

    # --- reporting ----------------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line for the start-up banner."""
        return self.label

    def progress(self) -> str:
        """A few words for the live progress line (the state right now)."""
        return ""

    def epoch_fields(self) -> Dict[str, Any]:
        """Per-epoch figures for ``log.jsonl`` and TensorBoard; keys start with ``<name>_``."""
        return {}

    def step_fields(self) -> Dict[str, Any]:
        """The state the last iteration trained in, as numbers for the per-iteration log (``log_every``): keys start
        with ``<name>_``. Asked on rank 0 only, every ``log_every`` iterations: no collectives, nothing costly."""
        return {}

    def epoch_text(self) -> str:
        """The method's part of the one-line epoch summary."""
        return ""

    def summary(self) -> Dict[str, Any]:
        """The method's entry in ``summary.json``."""
        return {}

    def boundaries(self) -> List[int]:
        """Epochs where the method changes phase (marked in comparison plots)."""
        return []

    def plan_state(self, clock: Clock, num_patches: int) -> str:
        """The method's state in epoch ``clock.epoch`` of a run of ``clock.epochs`` epochs of
        ``clock.iters_per_epoch`` iterations, on ``num_patches`` patches, as short text for ``main.py --plan`` (a new
        plan row starts where it changes); computed from the config alone, without a model or data. Default: ""."""
        return ""

    # --- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """State that must survive a checkpoint (plain data and tensors only: loaded with ``weights_only``).

        Called on every process before rank 0 writes, so a method may gather per-process state here (collectives
        are allowed); only rank 0's return value is written. ``load_state_dict`` runs on every process."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    # --- evaluation and measurement -----------------------------------------------------------------------
    def eval_variants(self) -> Dict[str, Callable[[], contextlib.AbstractContextManager]]:
        """Extra evaluations besides the default one: ``{suffix: context factory}``, logged as ``val_<suffix>_*``."""
        return {}

    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        """The states to count and time, with their share of the schedule (default: one state, the whole run)."""
        return [Variant(self.label, 1.0, lambda model: None, num_patches)]

    def op_modules(self, model: nn.Module) -> List[nn.Module]:
        """The method's own operator modules inside ``model`` (their FLOPs and time are reported separately)."""
        return []

    def data_fraction(self) -> float:
        """The fraction of the training set one epoch presents (an example-level method trains on a subset)."""
        return 1.0

    def inference_knob(self) -> Optional[InferenceKnob]:
        return None

    # --- published figures ----------------------------------------------------------------------------------
    @classmethod
    def published_rows(cls) -> List[PublishedRow]:
        """The published rows of this method's paper(s), without a config: the ``ROWS`` list of the package's
        ``published.py`` beside its ``method.py`` (none: ``[]``)."""
        package, _, module = cls.__module__.rpartition(".")
        if not package or module != "method" or importlib.util.find_spec(f"{package}.published") is None:
            return []
        return list(getattr(importlib.import_module(f"{package}.published"), "ROWS", []))

    def published(self) -> List[PublishedRow]:
        """The published rows this method offers to compare a run with (default: its class's rows; ``[]`` for a
        method without a ``published.py``)."""
        return self.published_rows()


# ---------------------------------------------------------------------------------------------- the registry
_REGISTRY: Dict[str, Type[Method]] = {}
_DISCOVERED = False


def register_method(cls: Type[Method]) -> Type[Method]:
    """Class decorator: make ``cls`` the method of config section ``cls.name``."""
    if not cls.name or not cls.name.isidentifier():
        raise TypeError(f"{cls.__name__}.name must be an identifier: it is the config section")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named '{cls.name}' is already registered ({_REGISTRY[cls.name].__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import ``<package>/method.py`` of every package beside this file (each registers its method)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for entry in sorted(os.listdir(ROOT)):
        if os.path.isfile(os.path.join(ROOT, entry, "method.py")) and os.path.isfile(os.path.join(ROOT, entry, "__init__.py")):
            importlib.import_module(f"{entry}.method")


def registry() -> Dict[str, Type[Method]]:
    """Section name -> method class, for every registered method."""
    _discover()
    return dict(_REGISTRY)


def method_class(name: str) -> Type[Method]:
    reg = registry()
    if name not in reg:
        raise MethodError(f"unknown method '{name}' (known: {', '.join(sorted(reg)) or 'none'})")
    return reg[name]


def published_rows(names: Optional[Sequence[str]] = None) -> List[PublishedRow]:
    """The published rows of every registered method (or of ``names``), in section-name order; no config needed."""
    reg = registry()
    return [row for name in (sorted(reg) if names is None else names) for row in method_class(name).published_rows()]


def parse_combination(text: str) -> List[str]:
    """``none`` -> ``[]``; ``toe`` -> ``["toe"]``; ``toe+pss`` -> ``["toe", "pss"]`` (as ``compare.py --methods``)."""
    text = text.strip()
    if text in ("", "none"):
        return []
    names = [t.strip() for t in text.split("+")]
    for n in names:
        method_class(n)
    if len(set(names)) != len(names):
        raise MethodError(f"'{text}' names a method twice")
    return names


# ---------------------------------------------------------------------------------------------- a run's methods
class MethodSet:
    """The active methods of a run, in config order; fans every hook out to them."""

    def __init__(self, methods: Sequence[Method]):
        self.methods = list(methods)
        self.per_step = [m for m in self.methods if m.per_step]
        self.observers = [m for m in self.methods if m.observes_examples]

    @classmethod
    def from_config(cls, cfg) -> "MethodSet":
        methods = [method_class(name)(cfg.sections[name], cfg) for name in cfg.active_methods()]
        check_token_sites(methods)
        return cls(methods)

    def __iter__(self) -> Iterator[Method]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    @property
    def names(self) -> List[str]:
        return [m.name for m in self.methods]

    def patch(self, model: nn.Module) -> nn.Module:
        for m in self.methods:
            m.patch(model)
        return model

    def attach(self, models: Sequence[nn.Module]) -> None:
        models = [m for m in models if m is not None]
        for m in self.methods:
            m.attach(models)

    def on_epoch(self, clock: Clock) -> None:
        for m in self.methods:
            m.on_epoch(clock)

    def on_step(self, clock: Clock) -> None:
        for m in self.per_step:
            m.on_step(clock)

    def recipe(self, epoch: int) -> Recipe:
        out, owner = Recipe(), ""
        for m in self.methods:
            mine = m.recipe(epoch)
            if mine != Recipe():
                out, owner = out.merged(mine, (owner, m.name)), owner or m.name
        return out

    def resize_images(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """``images`` at ``size`` px, by the method that changes the input size (else antialiased bilinear)."""
        for m in self.methods:
            out = m.resize_images(images, size)
            if out is not None:
                return out
        return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)

    def train_indices(self, epoch: int, dataset_len: int) -> Optional[List[int]]:
        """The intersection of what every method asks for (``None``: the whole dataset)."""
        chosen: Optional[set] = None
        for m in self.methods:
            idx = m.train_indices(epoch, dataset_len)
            if idx is not None:
                chosen = set(idx) if chosen is None else chosen & set(idx)
        return sorted(chosen) if chosen is not None else None

    def observe(self, batch: ExampleBatch) -> None:
        for m in self.observers:
            m.observe(batch)

    def progress(self) -> str:
        return " ".join(p for p in (m.progress() for m in self.methods) if p)

    def epoch_text(self) -> str:
        return " | ".join(t for t in (m.epoch_text() for m in self.methods) if t)

    def epoch_fields(self) -> Dict[str, Any]:
        return self._fields("epoch_fields")

    def step_fields(self) -> Dict[str, Any]:
        return self._fields("step_fields")

    def _fields(self, hook: str) -> Dict[str, Any]:
        """Every method's ``epoch_fields`` or ``step_fields``, each key under the method's own prefix."""
        out: Dict[str, Any] = {}
        for m in self.methods:
            fields = getattr(m, hook)()
            bad = [k for k in fields if not k.startswith(m.name + "_")]
            if bad:
                raise RuntimeError(f"method {m.name} logs '{bad[0]}': its fields must start with '{m.name}_'")
            out.update(fields)
        return out

    def describe(self) -> str:
        return "; ".join(m.describe() for m in self.methods) or "no method (the plain recipe)"

    def summary(self) -> Dict[str, Any]:
        return {m.name: m.summary() for m in self.methods}

    def boundaries(self) -> Dict[str, List[int]]:
        return {m.name: m.boundaries() for m in self.methods if m.boundaries()}

    def state_dict(self) -> Dict[str, Any]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for m in self.methods:
            if m.name in state:
                m.load_state_dict(state[m.name])

    def eval_variants(self) -> Dict[str, Callable[[], contextlib.AbstractContextManager]]:
        out = {}
        for m in self.methods:
            out.update(m.eval_variants())
        return out

    def op_modules(self, model: nn.Module) -> List[nn.Module]:
        return [op for m in self.methods for op in m.op_modules(model)]

    def data_fraction(self) -> float:
        return _product(m.data_fraction() for m in self.methods)

    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        """Every combination of the methods' states, with the product of their shares, epoch by epoch (the methods'
        schedules are independent of each other). With no method: one state, the plain model."""
        per_method = [m.variants(num_patches, epochs, iters_per_epoch) for m in self.methods]
        if not per_method:
            return [Variant("full tokens", 1.0, lambda model: None, num_patches)]
        out = []
        for combo in itertools.product(*per_method):
            def apply(model, combo=combo):
                for v in combo:
                    v.apply(model)
            spans = [v.epochs for v in combo if v.epochs is not None]
            tokens = [v.patch_tokens for v in combo if v.patch_tokens is not None]
            sizes = [v.input_size for v in combo if v.input_size is not None]
            per_epoch = [_product(v.share_in_epoch(e) for v in combo) for e in range(epochs)]
            share = sum(per_epoch) / epochs if len(combo) > 1 else combo[0].share
            if len(combo) > 1 and share == 0:
                continue                 # states that never meet (e.g. a curriculum phase and a later ToE stage)
            out.append(Variant(" + ".join(v.label for v in combo), share, apply, min(tokens) if tokens else None,
                               spans[0] if len(spans) == 1 else None, per_epoch if len(combo) > 1 else combo[0].epoch_shares,
                               sizes[0] if sizes else None))
        return out

    def inference_knobs(self) -> List[InferenceKnob]:
        return [k for k in (m.inference_knob() for m in self.methods) if k is not None]


def _product(xs) -> float:
    out = 1.0
    for x in xs:
        out *= x
    return out


def check_token_sites(methods: Sequence[Method]) -> None:
    """Two methods may not change tokens at the same place, and a method that needs the full patch grid at its
    input (ToE's seeds are raster positions) may not follow one that already dropped or reordered tokens."""
    sites = sorted(((m.token_site(), m) for m in methods if m.token_site() is not None), key=lambda sm: sm[0].site)
    for (a, ma), (b, mb) in zip(sites, sites[1:]):
        if a.site == b.site:
            raise MethodError(f"methods: {ma.name} and {mb.name} both change the tokens at the same place "
                              f"({a.what or a.site} / {b.what or b.site}); use one of them or move one")
    for i, (s, m) in enumerate(sites):
        if s.needs_full_grid and i > 0:
            prev_site, prev = sites[i - 1]
            raise MethodError(f"methods: {m.name} needs the full patch grid at its input ({s.what}) but {prev.name} "
                              f"already reduces the tokens before it ({prev_site.what}); they cannot be combined")
