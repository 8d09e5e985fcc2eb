"""Training-acceleration methods as plug-ins: the interface, the registry and the set of methods a run uses.

A method (Token Expansion, the Patch Sampling Schedule, Tri-Level E-ViT, ...) is a package with a ``method.py`` that
defines one :class:`Method` subclass and registers it under the name of its config section::

    @register_method
    class MyMethod(Method):
        name = "mine"                   # the config section `mine:` and the prefix of its log fields
        label = "Mine"
        Config = MineConfig             # a dataclass: the section's keys, types and defaults

The engine and the entrypoint only ever talk to a :class:`MethodSet` at a handful of typed points (the nearest
anchor is MosaicML Composer's algorithms and events, kept smaller): build the model (``patch``, which returns the
method's operator modules), follow the training clock (``on_epoch`` / ``on_step``), change the recipe per epoch
(``recipe``: input size, batch, RandAugment, how batches are resized; the trainer rebuilds the loaders and resizes the
model), choose and observe training examples (``train_indices`` / ``observe``), report (``fields``: numbers the generic
code logs and formats; ``plan_state``: the state of an epoch from the config alone, which also marks the phase
boundaries), checkpoint (``state_dict`` / ``load_state_dict``), and be measured and evaluated (``variants``: the
states to count, time and evaluate; ``inference_knob``: a setting to sweep at inference). Every hook has a do-nothing
default, so a method implements only what it changes. Packages beside this file that hold a ``method.py`` are
imported on first use of the registry: a new method needs its package and a config, nothing else
(``docs/adding_a_method.md`` walks through one).
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from plugins import Registry


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


VARIANT_USES = ("train", "eval")


@dataclass
class Variant:
    """One state of a method: FLOPs are counted and steps timed with the model in it (``use: train``), or the model
    is also evaluated in it every epoch, logged as ``val_<key>_*`` (``use: eval``).

    ``share``: the fraction of all training images that go through the model in this state (the shares of one
    method's training states sum to 1); ``apply(model)`` puts a model in this state with the method's operator on
    also in eval mode, and returns a function that puts the model back (``None``: nothing to undo; an ``eval`` state
    must return one). ``data_fraction``: the fraction of the training set an epoch presents in this state (an
    example-level method trains on a subset).
    """
    label: str
    share: float
    apply: Callable[[nn.Module], Optional[Callable[[], None]]]
    patch_tokens: Optional[int] = None
    epochs: Optional[Tuple[int, int]] = None      # [first, last) when the state is a span of epochs
    # per epoch, the fraction of that epoch's iterations in this state (default: from `epochs`, else `share`)
    epoch_shares: Optional[Sequence[float]] = None
    input_size: Optional[int] = None              # the image size of this state (None: the config's input_size)
    data_fraction: float = 1.0
    use: str = "train"
    key: str = ""                                 # use eval: the suffix of the val_<key>_* fields

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
    are brought to that size by ``resize(images, size)`` (``None``: antialiased bilinear); ``eval_size`` is the size
    evaluation runs at. ``resize`` must be a module-level function, so that one epoch's recipe equals the next's.
    """
    batch_size: Optional[int] = None          # per process
    grad_accum_steps: Optional[int] = None
    aa: Optional[str] = None                  # timm RandAugment / auto-augment policy string
    input_size: Optional[int] = None
    eval_size: Optional[int] = None
    resize: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None

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
    registry (:func:`published_rows`). A run matches a row when it names it in its
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
FIELD_SCOPES = ("run", "epoch", "step")
OP_TAG = "method_op"            # the attribute that marks a method's operator module (survives copy.deepcopy)


class Method:
    """Base class of a method plug-in. ``section`` is the validated config section, ``cfg`` the whole run config.

    ``models`` (every model of the run that carries the patch: the trained one, its EMA copy) and ``ops`` (the
    operator modules :meth:`patch` returned, in those models) are set by :meth:`MethodSet.attach` before training.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    Config: ClassVar[type]
    per_step: ClassVar[bool] = False              # on_step() runs every iteration (else only on_epoch())
    observes_examples: ClassVar[bool] = False     # observe() gets every training batch's per-example outputs

    def __init__(self, section: Any, cfg: Any):
        self.section, self.cfg = section, cfg
        self.models: List[nn.Module] = []
        self.ops: List[nn.Module] = []

    # --- configuration ------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, section: Any, cfg: Any) -> None:
        """Check the section against itself and the run config; raise :class:`MethodError` naming the key."""

    def token_site(self) -> Optional[TokenSite]:
        """Where this method changes the token count (``None``: it does not)."""
        return None

    # --- the model ----------------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> Sequence[nn.Module]:
        """Change the live model built by the factory (hooks, module swaps); raise MethodError if it cannot. Returns
        the method's own operator modules (their FLOPs and time are reported on their own; ``self.ops`` later)."""
        return ()

    # --- the clock ----------------------------------------------------------------------------------------
    def on_epoch(self, clock: Clock) -> None:
        """Start of an epoch (also on resume)."""

    def on_step(self, clock: Clock) -> None:
        """Before every training iteration, when ``per_step`` is set."""

    # --- the recipe and the data -------------------------------------------------------------------------
    def recipe(self, epoch: int) -> Recipe:
        """The recipe settings this method imposes in ``epoch`` (default: none)."""
        return Recipe()

    def train_indices(self, epoch: int, dataset_len: int) -> Optional[Sequence[int]]:
        """Dataset indices to train on this epoch (``None``: all)."""
        return None

    def observe(self, batch: ExampleBatch) -> None:
        """Per-example outputs of a training step, when ``observes_examples`` is set."""

    # --- reporting ----------------------------------------------------------------------------------------
    def fields(self, scope: str) -> Dict[str, Any]:
        """The method's state as plain numbers (lists and dicts of them allowed), for ``scope``:

        * ``run``: what the run does, for the start line and the method's entry in ``summary.json``;
        * ``epoch``: per-epoch figures for ``log.jsonl``, TensorBoard and the epoch line; keys start with ``<name>_``;
        * ``step``: the state the last iteration trained in, for the live progress line and the per-iteration log
          (``log_every``); keys start with ``<name>_``. Asked on rank 0 only: no collectives, nothing costly.

        The generic code formats them (:func:`fields_text`). Default: none."""
        return {}

    def plan_state(self, clock: Clock, num_patches: int) -> str:
        """The method's state in epoch ``clock.epoch`` of a run of ``clock.epochs`` epochs of
        ``clock.iters_per_epoch`` iterations, on ``num_patches`` patches, as short text for ``main.py --plan``,
        computed from the config alone. A new plan row starts where it changes, and comparison plots mark those
        epochs as the method's phase boundaries. Default: "" (one phase)."""
        return ""

    # --- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """State that must survive a checkpoint (plain data and tensors only: loaded with ``weights_only``).

        Called on every process before rank 0 writes, so a method may gather per-process state here (collectives
        are allowed); only rank 0's return value is written. ``load_state_dict`` runs on every process."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    # --- measurement and evaluation -----------------------------------------------------------------------
    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        """The states to count and time, with their share of the schedule (default: one state, the whole run), and
        the states to evaluate in besides the default one (``use: eval``)."""
        return [Variant(self.label, 1.0, lambda model: None, num_patches)]

    def inference_knob(self) -> Optional[InferenceKnob]:
        """A setting ``scripts/sweep.py`` moves at inference (PSS: the patch keep rate); ``None``: none."""
        return None


def fields_text(label: str, fields: Mapping[str, Any], prefix: str = "") -> str:
    """``label: key value, key value`` with ``prefix`` cut from the keys and floats at 3 significant digits."""
    def text(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, (list, tuple)):
            return "/".join(text(x) for x in v)
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {text(x)}" for k, x in v.items()) + "}"
        return str(v)
    parts = [f"{k[len(prefix):] if prefix and k.startswith(prefix) else k} {text(v)}" for k, v in fields.items()
             if v is not None]
    return f"{label}: {', '.join(parts)}" if parts else label


# ---------------------------------------------------------------------------------------------- the registry
_REGISTRY: Registry[Method] = Registry("method", "method")
register_method = _REGISTRY.register          # class decorator: ``cls`` is the method of config section ``cls.name``
unregister_method = _REGISTRY.unregister


def registry() -> Dict[str, Type[Method]]:
    """Section name -> method class, for every registered method (imported from ``<package>/method.py``)."""
    return _REGISTRY.classes()


def method_class(name: str) -> Type[Method]:
    reg = registry()
    if name not in reg:
        raise MethodError(f"unknown method '{name}' (known: {', '.join(sorted(reg)) or 'none'})")
    return reg[name]


def published_rows(names: Optional[Sequence[str]] = None) -> List[PublishedRow]:
    """The published rows of every registered method (or of ``names``), in section-name order, without a config:
    the ``ROWS`` list of the ``published.py`` beside each method's ``method.py`` (none: no rows)."""
    reg = registry()
    out: List[PublishedRow] = []
    for name in sorted(reg) if names is None else names:
        package, _, module = method_class(name).__module__.rpartition(".")
        if package and module == "method" and importlib.util.find_spec(f"{package}.published") is not None:
            out += list(getattr(importlib.import_module(f"{package}.published"), "ROWS", []))
    return out


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
def bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The default way a batch is brought to another input size: antialiased bilinear."""
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


class MethodSet:
    """The active methods of a run, in config order; fans every hook out to them and formats what they report."""

    def __init__(self, methods: Sequence[Method]):
        self.methods = list(methods)
        self.per_step = [m for m in self.methods if m.per_step]
        self.observers = [m for m in self.methods if m.observes_examples]
        self.resize: Callable[[torch.Tensor, int], torch.Tensor] = bilinear_resize

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

    # --- the model ------------------------------------------------------------------------------------------
    def patch(self, model: nn.Module) -> nn.Module:
        """Every method patches ``model``; the operator modules each returns are tagged with its name."""
        for m in self.methods:
            for op in m.patch(model) or ():
                setattr(op, OP_TAG, m.name)
        return model

    def attach(self, models: Sequence[Optional[nn.Module]]) -> None:
        """Tell every method the run's patched models (the trained one, its EMA copy) and its operators in them."""
        models = [m for m in models if m is not None]
        for m in self.methods:
            m.models = list(models)
            m.ops = [op for model in models for op in self.op_modules(model, m.name)]

    @staticmethod
    def op_modules(model: nn.Module, name: Optional[str] = None) -> List[nn.Module]:
        """The methods' operator modules inside ``model`` (of the method ``name`` only, when given)."""
        return [op for op in model.modules() if getattr(op, OP_TAG, None) is not None
                and (name is None or getattr(op, OP_TAG) == name)]

    # --- the clock, the recipe and the data -----------------------------------------------------------------
    def on_epoch(self, clock: Clock) -> None:
        self.resize = self.recipe(clock.epoch).resize or bilinear_resize
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
        """``images`` at ``size`` px, the way the recipe of the current epoch says (default: antialiased bilinear)."""
        return self.resize(images, size)

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

    # --- reporting ------------------------------------------------------------------------------------------
    def epoch_fields(self) -> Dict[str, Any]:
        return self._prefixed("epoch")

    def step_fields(self) -> Dict[str, Any]:
        return self._prefixed("step")

    def _prefixed(self, scope: str) -> Dict[str, Any]:
        """Every method's ``epoch`` or ``step`` fields, each key under the method's own prefix."""
        out: Dict[str, Any] = {}
        for m in self.methods:
            fields = m.fields(scope)
            bad = [k for k in fields if not k.startswith(m.name + "_")]
            if bad:
                raise RuntimeError(f"method {m.name} logs '{bad[0]}': its fields must start with '{m.name}_'")
            out.update(fields)
        return out

    def progress(self) -> str:
        """The live state, for the progress line: ``ToE: stage 1, kept_tokens 98``."""
        return " ".join(fields_text(m.label, f, m.name + "_") for m in self.methods if (f := m.fields("step")))

    def epoch_text(self) -> str:
        return " | ".join(fields_text(m.label, f, m.name + "_") for m in self.methods if (f := m.fields("epoch")))

    def describe(self) -> str:
        return "; ".join(fields_text(m.label, m.fields("run")) for m in self.methods) or "no method (the plain recipe)"

    def summary(self) -> Dict[str, Any]:
        return {m.name: m.fields("run") for m in self.methods}

    def boundaries(self, epochs: int, iters_per_epoch: int, num_patches: int) -> Dict[str, List[int]]:
        """Per method, the epochs where its :meth:`Method.plan_state` changes (its phase boundaries)."""
        out = {}
        for m in self.methods:
            states = [m.plan_state(Clock(e, 0, e * iters_per_epoch, iters_per_epoch, epochs), num_patches)
                      for e in range(epochs)]
            marks = [e for e in range(1, epochs) if states[e] != states[e - 1]]
            if marks:
                out[m.name] = marks
        return out

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for m in self.methods:
            if m.name in state:
                m.load_state_dict(state[m.name])

    # --- measurement and evaluation -------------------------------------------------------------------------
    def eval_variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> Dict[str, Variant]:
        """The extra evaluations of every epoch, by the suffix of their ``val_<suffix>_*`` fields."""
        out = {}
        for m in self.methods:
            for v in m.variants(num_patches, epochs, iters_per_epoch):
                if v.use == "eval":
                    out[v.key] = v
        return out

    def data_fraction(self, num_patches: int, epochs: int, iters_per_epoch: int) -> float:
        """The fraction of the training set an epoch presents (the product over the methods' training states)."""
        return _product(next((v.data_fraction for v in m.variants(num_patches, epochs, iters_per_epoch)
                              if v.use == "train"), 1.0) for m in self.methods)

    def variants(self, num_patches: int, epochs: int, iters_per_epoch: int) -> List[Variant]:
        """Every combination of the methods' training states, with the product of their shares, epoch by epoch (the
        methods' schedules are independent of each other). With no method: one state, the plain model."""
        per_method = [[v for v in m.variants(num_patches, epochs, iters_per_epoch) if v.use == "train"]
                      for m in self.methods]
        if not per_method:
            return [Variant("full tokens", 1.0, lambda model: None, num_patches)]
        out = []
        for combo in itertools.product(*per_method):
            v = _combined(combo, epochs)
            if v is not None:
                out.append(v)
        return out

    def inference_knobs(self) -> List[InferenceKnob]:
        return [k for k in (m.inference_knob() for m in self.methods) if k is not None]


def _combined(combo: Sequence[Variant], epochs: int) -> Optional[Variant]:
    """One state of several methods at once (``None``: their states never meet, e.g. a curriculum phase and a later
    ToE stage)."""
    if len(combo) == 1:
        return combo[0]

    def apply(model):
        undo = [u for u in (v.apply(model) for v in combo) if u is not None]
        return (lambda: [u() for u in reversed(undo)]) if undo else None
    spans = [v.epochs for v in combo if v.epochs is not None]
    tokens = [v.patch_tokens for v in combo if v.patch_tokens is not None]
    sizes = [v.input_size for v in combo if v.input_size is not None]
    per_epoch = [_product(v.share_in_epoch(e) for v in combo) for e in range(epochs)]
    share = sum(per_epoch) / epochs
    if share == 0:
        return None
    return Variant(" + ".join(v.label for v in combo), share, apply, min(tokens) if tokens else None,
                   spans[0] if len(spans) == 1 else None, per_epoch, sizes[0] if sizes else None,
                   _product(v.data_fraction for v in combo))


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
