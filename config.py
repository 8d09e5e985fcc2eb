"""Run configuration: a typed schema, YAML files that may inherit, command-line overrides, and validation.

Keys are DeiT's argparse names (``lr``, ``drop_path``, ``model_ema_decay`` ...) with DeiT's defaults, so a DeiT user
reads a config without a dictionary. Each training-acceleration method owns a section named after it (``toe:``,
``pss:`` ...): its schema and checks live in the method's package and are found through :mod:`methods`; the
top-level ``methods`` key says which sections are active (default: every section present). A section that changes
what the model learns from rather than what it computes is an extension (:mod:`extensions`): present means on.

    cfg = load_config("configs/deit_s_toe.yaml", ["--lr", "1e-3", "--toe.keep_rates", "[0.4,0.7,1.0]"])

Every mistake stops with one :class:`ConfigError` line that names the key and the fix: unknown keys (with the
closest valid name), wrong types, impossible values and impossible method settings.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from config_sources import ConfigError, deep_merge, parse_overrides, read_yaml
from extensions import ExtensionError, extension_class, extension_classes
from files import first_line
from methods import MethodError, method_class, registry


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------------------------
    output_dir: str = "runs/default"           # where the run writes; a fresh run refuses a directory holding one
    seed: int = 0                              # seeds the shuffle, the augmentations and the initialisation
    device: str = "auto"                       # auto | cpu | cuda
    num_workers: int = 10                      # data-loader worker processes per training process
    pin_memory: bool = True                    # pin loader memory (GPU only)
    loader: str = "fast"                       # fast: workers hand over uint8 images, normalisation and erasing run on the device (same batches) | reference: normalised float images from the workers | dali: NVIDIA DALI decodes and augments on the GPU (optional: pip install -r requirements-dali.txt; other pixels: docs/measuring.md)
    print_freq: int = 20                       # iterations between plain log lines (off a terminal)
    tensorboard: bool = True                   # also write TensorBoard scalars under output_dir/tensorboard
    log_every: int = 0                         # iterations between records of iterations.jsonl (loss, lr, grad norm, method state; 1: every one); 0: off
    eval: bool = False                         # evaluate `resume`/`finetune` weights and exit
    resume: str = ""                           # checkpoint to continue from ("auto": output_dir/checkpoint.pth if present)
    resume_optimizer: bool = True              # on resume, keep the optimizer's moments (false: start them afresh)
    finetune: str = ""                         # initialise weights from a checkpoint, fresh optimizer and schedule
    save_every: int = 1                        # epochs between checkpoint.pth writes
    # --- reproduction ----------------------------------------------------------------------------------------
    reproduces: Any = None   # the published row(s) this recipe reproduces: {paper: ..., row: ...} or a list of them (methods.published_rows(); scripts/tables.py)
    nproc: Optional[int] = None                # processes the recipe expects ("4 x 256"); a run with another count says how its global batch and lr differ
    # --- data ------------------------------------------------------------------------------------------------
    data_set: str = "imagenet"                 # imagenet | cifar10 | cifar100 | folder | digits
    data_path: str = "data/imagenet"           # dataset root (ImageFolder train/ and val/, or the CIFAR files)
    nb_classes: Optional[int] = None           # checked against the dataset; taken from it when empty
    input_size: int = 224                      # image side in pixels
    skip_bad_images: bool = False              # skip unreadable images (counted in the log) instead of stopping
    # --- model -----------------------------------------------------------------------------------------------
    model: str = "deit_small_patch16_224"      # any timm ViT name
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments (merged key by key)
    drop: float = 0.0                          # dropout rate
    drop_path: float = 0.1                     # stochastic-depth rate
    grad_checkpointing: bool = False           # recompute activations in backward (less memory)
    compile: bool = False                      # torch.compile the training model
    amp: str = "auto"                          # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | none
    # --- EMA -------------------------------------------------------------------------------------------------
    model_ema: bool = True                     # keep an exponential moving average of the weights
    model_ema_decay: float = 0.99996           # EMA decay per optimizer step
    model_ema_eval: bool = True                # evaluate the EMA every epoch
    best_on: str = "model"                     # model | ema: whose val top-1 picks best.pth
    # --- optimisation ----------------------------------------------------------------------------------------
    epochs: int = 300                          # training epochs (the lr schedule's length; cooldown_epochs follow)
    cooldown_epochs: int = 0                   # epochs trained after `epochs` at min_lr (timm; LV-ViT trains 300 + 10)
    sched_step: str = "timm"                   # timm: epoch e trains with lr(e) | published: DeiT's loop, epoch e trains with lr(e - 1) (epochs 0 and 1 at warmup_lr) | iteration: set before each optimizer update, the decay after the warm-up (ConvNeXt / EfficientTrain code) | swin: stepped after each update (update g trains with lr(g - 1)), one decay over all updates whose first ones the warm-up replaces (SimMIM / Swin code)
    epoch_updates: str = "loader"              # loader: every micro-batch of the loader (a last, smaller update when grad_accum_steps does not divide them) | images: at most images // global batch updates, the micro-batches past them not trained (ConvNeXt / EfficientTrain engine)
    batch_size: int = 64                       # per process; global batch = batch_size * world_size * grad_accum_steps
    grad_accum_steps: int = 1                  # iterations per optimizer step
    opt: str = "adamw"                         # adamw | adam | sgd | lamb
    opt_eps: float = 1e-8                      # optimizer epsilon (Adam family)
    opt_betas: Optional[List[float]] = None    # [beta1, beta2] (Adam family); null: the optimizer's default
    momentum: float = 0.9                      # SGD momentum, in [0, 1)
    weight_decay: float = 0.05                 # decoupled weight decay (not on biases and norms)
    layer_decay: Optional[float] = None        # layer-wise lr decay (BEiT/SimMIM fine-tuning), by timm's optimizer factory
    layer_decay_bounds: str = "scaled"         # scaled: each layer group's scale multiplies its whole lr curve, warmup_lr and min_lr included (timm 1.x) | shared: it multiplies the peak only, warmup_lr and min_lr are the same for every group (SimMIM / Swin code)
    clip_grad: Optional[float] = None          # max gradient norm; null: no clipping
    lr: float = 5e-4                           # for a global batch of lr_base_batch
    lr_base_batch: int = 512                   # the global batch lr is given for (linear scaling rule)
    unscale_lr: bool = False                   # true: use lr as given, no scaling by the global batch
    sched: str = "cosine"                      # cosine | step | constant
    warmup_lr: float = 1e-6                    # lr at the start of the warm-up
    min_lr: Optional[float] = 1e-5             # lr floor of the cosine schedule; null: unknown (--plan shows it, training refuses until set)
    warmup_epochs: int = 5                     # epochs of linear warm-up
    decay_epochs: int = 30                     # step schedule only
    decay_rate: float = 0.1                    # step schedule only
    # --- augmentation and regularisation -------------------------------------------------------------------
    color_jitter: float = 0.3                  # colour-jitter strength (no effect while RandAugment is on)
    aa: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm auto-augment policy (rand-..., augmix-..., v0, original); null: none
    smoothing: float = 0.1                     # label smoothing, in [0, 1)
    train_interpolation: str = "bicubic"       # resize interpolation in training (bilinear, bicubic, random)
    hflip: float = 0.5                         # horizontal-flip probability (0 for digits and text)
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])   # RandomResizedCrop area range
    repeated_aug: bool = True                  # repeated augmentation (each image ra_repeats times per epoch)
    ra_repeats: int = 3                        # copies per image with repeated augmentation
    repeated_aug_single: str = "always"        # always: repeated augmentation on one process too | published: only when distributed (DeiT: a plain random sampler on one process)
    reprob: float = 0.25                       # random-erasing probability
    remode: str = "pixel"                      # random-erasing fill: pixel | rand | const
    recount: int = 1                           # random-erasing boxes per image
    mixup: float = 0.8                         # mixup alpha (0: off)
    cutmix: float = 1.0                        # cutmix alpha (0: off)
    cutmix_minmax: Optional[List[float]] = None   # cutmix box ratio range (overrides cutmix alpha)
    cutmix_box: str = "timm"                   # timm: timm 1.x's box (a side of odd length c cut in full) | published: timm < 1.0's, which every published code ran (c - 1 px)
    mixup_prob: float = 1.0                    # probability of mixing a batch
    mixup_switch_prob: float = 0.5             # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"                  # batch | pair | elem: how mixing parameters are drawn
    eval_crop_ratio: float = 0.875             # centre-crop ratio in evaluation (resize to input_size / ratio)
    # --- knowledge distillation ------------------------------------------------------------------------------
    distillation_type: str = "none"            # none | soft | hard
    teacher_model: str = "regnety_160"         # timm name of the teacher
    teacher_path: str = ""                     # local checkpoint file of the teacher
    teacher_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments
    distillation_alpha: float = 0.5            # weight of the distillation loss, in [0, 1]
    distillation_tau: float = 1.0              # temperature of soft distillation
    # the extension sections by name (see extensions.py), each the dataclass its extension declares; written as
    # top-level keys (null: off)
    extensions: Dict[str, Any] = field(default_factory=dict)
    # --- methods ---------------------------------------------------------------------------------------------
    methods: Optional[List[str]] = None        # active method sections, in order; null: every section present
    # the method sections by name (`toe:` ...), each the dataclass its method declares; written as top-level keys
    sections: Dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str):
        """``cfg.toe`` reads the method section ``toe`` (``None`` when absent) for every registered method, and
        likewise every registered extension's section."""
        if name.startswith("__") or name in ("sections", "extensions"):
            raise AttributeError(name)
        if name in registry():
            return self.sections.get(name)
        if name in extension_classes():
            return self.extensions.get(name)
        raise AttributeError(f"Config has no key '{name}'")

    def total_epochs(self) -> int:
        """The run's length: ``epochs`` of lr schedule plus ``cooldown_epochs`` at ``min_lr`` (timm's ``num_epochs``);
        the loop, the checkpoints and the methods' clock all count to it."""
        return self.epochs + self.cooldown_epochs

    def active_methods(self) -> List[str]:
        """The sections this run applies, in order."""
        return list(self.sections) if self.methods is None else list(self.methods)

    def to_dict(self) -> Dict[str, Any]:
        """Every key as the YAML writes it: each registered extension's section (null when off) in the place of
        ``extensions``, then the method sections, then ``methods``."""
        data = dataclasses.asdict(self)
        sections, methods, extensions = data.pop("sections"), data.pop("methods"), data["extensions"]
        out: Dict[str, Any] = {}
        for key, value in data.items():
            if key == "extensions":
                out.update({name: extensions.get(name) for name in extension_classes()})
            else:
                out[key] = value
        out.update(sections)
        out["methods"] = methods
        return out


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "loader": ("reference", "fast", "dali"),
    "data_set": ("imagenet", "cifar10", "cifar100", "folder", "digits"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "best_on": ("model", "ema"),
    "opt": ("adamw", "adam", "sgd", "lamb"),
    "sched": ("cosine", "step", "constant"),
    "mixup_mode": ("batch", "pair", "elem"),
    "remode": ("pixel", "rand", "const"),
    "distillation_type": ("none", "soft", "hard"),
    "sched_step": ("timm", "published", "iteration", "swin"),
    "repeated_aug_single": ("always", "published"),
    "epoch_updates": ("loader", "images"),
    "layer_decay_bounds": ("scaled", "shared"),
    "cutmix_box": ("timm", "published"),
}
NON_NEGATIVE = ("seed", "layer_decay", "num_workers", "weight_decay", "lr", "warmup_lr", "min_lr", "warmup_epochs",
                "mixup", "cutmix", "model_ema_decay", "clip_grad", "color_jitter", "opt_eps", "decay_epochs",
                "decay_rate", "recount", "cooldown_epochs", "log_every")
PROBABILITIES = ("reprob", "mixup_prob", "mixup_switch_prob", "hflip", "distillation_alpha")      # in [0, 1]
RATES = ("drop", "drop_path", "smoothing", "momentum")                                          # in [0, 1)
POSITIVE = ("epochs", "batch_size", "grad_accum_steps", "input_size", "lr_base_batch", "print_freq", "save_every",
            "ra_repeats", "distillation_tau", "eval_crop_ratio", "nb_classes", "nproc")


# ----------------------------------------------------------------------------------------------- type checking
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Return ``value`` as type ``tp`` (ints widen to float) or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping of keys) or null, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin in (list, List):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} (write e.g. [1, 2, 3])")
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-4, without a dot, as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}: {value!r} is not a finite number; give a real value, e.g. --{key} 5e-4")
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from ``data``: unknown keys, wrong types and values outside a field's
    ``metadata["choices"]`` stop with one line naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else "; python main.py --help lists them"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
        choices = fields[key].metadata.get("choices")
        if choices is not None and kwargs[key] is not None and kwargs[key] not in choices:
            raise ConfigError(f"{prefix}{key}: '{kwargs[key]}' is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)


SECTION_FIELDS = ("sections", "extensions")      # Config fields that hold sections: not keys of their own


def method_sections() -> Dict[str, type]:
    """The registered methods by section name; a method named like a config key of its own cannot have a section."""
    methods = registry()
    own_keys = {f.name for f in dataclasses.fields(Config)}
    for name in methods:
        if name in own_keys:
            raise ValueError(f"method name '{name}' is a config key already; a section needs a name of its own")
    return methods


def extension_sections() -> Dict[str, type]:
    """The registered extensions by section name; each needs a name no config key or method has."""
    extensions = extension_classes()
    taken = {f.name for f in dataclasses.fields(Config)} | set(registry())
    for name in extensions:
        if name in taken:
            raise ValueError(f"extension name '{name}' is a config key or method already; a section needs a name of its own")
    return extensions


def _build_config(data: Dict[str, Any]) -> Config:
    """The top level: Config's own keys, plus one section per registered method (``toe:`` ...) or extension."""
    methods, extensions = method_sections(), extension_sections()
    own, sections, extension_data = {}, {}, {}
    for key, value in data.items():
        if key in methods or key in extensions:
            if value is not None:
                into, cls = (sections, methods[key]) if key in methods else (extension_data, extensions[key])
                into[key] = _coerce(value, cls.Config, key)
        elif key in SECTION_FIELDS:
            raise ConfigError(f"unknown config key '{key}'; write each section at the top level (e.g. toe:)")
        else:
            own[key] = value
    own_keys = [f.name for f in dataclasses.fields(Config) if f.name not in SECTION_FIELDS]
    for key in own:
        if key not in own_keys:
            close = difflib.get_close_matches(key, own_keys + list(methods) + list(extensions), n=1, cutoff=0.5)
            hint = ("; python main.py --help lists them" if not close else
                    f"; did you mean the method section '{close[0]}'?" if close[0] in methods else
                    f"; did you mean '{close[0]}'?")
            raise ConfigError(f"unknown config key '{key}'{hint}")
    cfg = _build(Config, own)
    cfg.sections, cfg.extensions = sections, extension_data
    return cfg


# ------------------------------------------------------------------------------------------------ sections
def bool_keys() -> set:
    """Every boolean key, with its section prefix (``eval``, ``toe.sparse_eval``): these also work as bare flags."""
    keys = set()
    for prefix, cls in [("", Config)] + [(f"{n}.", c) for n, c in section_classes().items()]:
        hints = typing.get_type_hints(cls)
        keys |= {prefix + f.name for f in dataclasses.fields(cls) if hints.get(f.name) is bool}
    return keys


def section_classes() -> Dict[str, type]:
    """Section name -> dataclass, for every registered extension and every registered method."""
    return {**{name: e.Config for name, e in extension_classes().items()},
            **{name: m.Config for name, m in registry().items()}}


def _apply_overrides(data: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    data = dict(data)
    sections = set(extension_classes()) | set(registry())
    for key, value in overrides.items():
        if key in sections and isinstance(value, dict):
            current = data.get(key)
            data[key] = deep_merge(current if isinstance(current, dict) else {}, value)
        elif key in sections and (value is None or value is False
                                  or (isinstance(value, str) and value.lower() in ("none", "off", "false"))):
            data[key] = None       # --toe none: the same recipe without the method
            if key in registry() and isinstance(data.get("methods"), list) and key in data["methods"]:
                data["methods"] = [m for m in data["methods"] if m != key]
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = deep_merge(data[key], value)           # --model_kwargs '{depth: 2}' changes one key
        else:
            data[key] = value
    return data


def validate(cfg: Config) -> Config:
    """Checks that need more than a type: choices, ranges, and each section through its extension or method."""
    _check_ranges(cfg)
    _check_models_and_data(cfg)
    _check_extensions(cfg)
    reproduced_rows(cfg.reproduces)
    _check_methods(cfg)
    _check_loader(cfg)
    return cfg


def _check_loader(cfg: Config) -> None:
    """``loader: dali``: DALI installed, and a recipe its pipeline runs (one line saying what to change)."""
    if cfg.loader == "dali":
        from dali_loader import config_problem
        problem = config_problem(cfg)
        if problem is not None:
            raise ConfigError(problem)


def _check_ranges(cfg: Config) -> None:
    """Choices and numeric ranges of the top-level keys (a section checks its own: choices when built, ranges in
    its extension's or method's validate)."""
    flat = dataclasses.asdict(cfg)
    for key, choices in CHOICES.items():
        if key in flat and flat[key] not in choices:
            raise ConfigError(f"{key}: '{flat[key]}' is not one of {', '.join(choices)}")
    for key in NON_NEGATIVE:
        if flat.get(key) is not None and flat[key] < 0:
            raise ConfigError(f"{key}: {flat[key]} must be >= 0")
    for key in POSITIVE:
        if flat.get(key) is not None and flat[key] <= 0:
            raise ConfigError(f"{key}: {flat[key]} must be > 0")
    for key in PROBABILITIES:
        if not 0 <= getattr(cfg, key) <= 1:
            raise ConfigError(f"{key}: {getattr(cfg, key)} must be in [0, 1] (a probability)")
    for key in RATES:
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"{key}: {getattr(cfg, key)} must be in [0, 1)")
    if cfg.opt_betas is not None and (len(cfg.opt_betas) != 2 or not all(0 <= b < 1 for b in cfg.opt_betas)):
        raise ConfigError(f"opt_betas: {cfg.opt_betas} must be two values in [0, 1), e.g. [0.9, 0.999], or null for "
                          f"the optimizer's default")


def _check_models_and_data(cfg: Config) -> None:
    """The model names and arguments, augmentation, EMA, distillation and evaluation settings."""
    for key in ("model_kwargs", "teacher_kwargs"):
        _check_kwargs(key, getattr(cfg, key))
    check_model_name("model", cfg.model)
    if cfg.distillation_type != "none":
        check_model_name("teacher_model", cfg.teacher_model)
    cfg.aa = _check_auto_augment(cfg.aa)
    if len(cfg.crop_scale) != 2 or not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise ConfigError(f"crop_scale: {cfg.crop_scale} must be [min, max] with 0 < min <= max <= 1")
    if not cfg.model_ema_decay < 1.0:
        raise ConfigError(f"model_ema_decay: {cfg.model_ema_decay} must be < 1")
    if cfg.best_on == "ema" and not (cfg.model_ema and cfg.model_ema_eval):
        raise ConfigError("best_on: 'ema' needs model_ema: true and model_ema_eval: true")
    if cfg.distillation_type != "none" and not cfg.teacher_path:
        raise ConfigError(f"teacher_path: distillation_type '{cfg.distillation_type}' needs a local teacher checkpoint file")
    if cfg.eval and not (cfg.resume or cfg.finetune):
        raise ConfigError("eval: true needs weights: set resume (or finetune) to a checkpoint path")


def _check_extensions(cfg: Config) -> None:
    """Each extension section through its extension (its own ranges and the keys it cannot run with)."""
    try:
        for name, section in cfg.extensions.items():
            extension_class(name).validate(section, cfg)
    except ExtensionError as e:
        raise ConfigError(str(e)) from None


def _check_methods(cfg: Config) -> None:
    """The ``methods`` list, each active section through its method, and their combination."""
    for name in cfg.methods or []:
        if name not in registry():
            raise ConfigError(f"methods: unknown method '{name}' (known: {', '.join(sorted(registry()))})")
        if name not in cfg.sections:
            raise ConfigError(f"methods: '{name}' is listed but the config has no {name}: section; add one "
                              f"(e.g. --{name} '{{}}' for its defaults) or drop it from methods")
    if cfg.methods is not None and len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"methods: {cfg.methods} names a method twice")
    try:       # inactive sections are data (types and choices checked when built); their run checks wait
        for name in cfg.active_methods():
            method_class(name).validate(cfg.sections[name], cfg)
        from methods import MethodSet
        MethodSet.from_config(cfg)           # combinations (e.g. two token reducers at conflicting places)
    except MethodError as e:
        raise ConfigError(str(e)) from None


def reproduced_rows(value: Any) -> Optional[List[Tuple[str, str]]]:
    """The ``(paper, row)`` pairs that ``reproduces: {paper: P, row: R}`` (or a list of them: a baseline recipe is a
    row of several tables) names, each a row of :func:`methods.published_rows` (one line otherwise); ``None``
    without the key. The one reading of the key, for the config's checks and for ``scripts/tables.py``."""
    if value is None:
        return None
    return [_reproduced_row(item) for item in (value if isinstance(value, list) and value else [value])]


def _reproduced_row(value: Any) -> Tuple[str, str]:
    from methods import published_rows
    if not isinstance(value, dict) and hasattr(value, "paper") and hasattr(value, "row"):
        value = {"paper": value.paper, "row": value.row}        # an object with the two fields reads as the mapping
    if not isinstance(value, dict):
        raise ConfigError(f"reproduces: expected a mapping {{paper: NAME, row: LABEL}} or a list of them, got {value!r}")
    if set(value) != {"paper", "row"} or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"reproduces: {value!r} must be {{paper: NAME, row: LABEL}} (two strings), e.g. "
                          f"{{paper: toe, row: DeiT-S ToE}}")
    rows = published_rows()
    papers = sorted({r.paper for r in rows})
    if value["paper"] not in papers:
        raise ConfigError(f"reproduces.paper: unknown paper '{value['paper']}' (known: {', '.join(papers)})")
    labels = [r.row for r in rows if r.paper == value["paper"]]
    if value["row"] not in labels:
        close = difflib.get_close_matches(value["row"], labels, n=3, cutoff=0.4)
        hint = (f"; close rows: {'; '.join(repr(c) for c in close)}" if close
                else f"; scripts/tables.py --published lists the rows")
        raise ConfigError(f"reproduces.row: paper '{value['paper']}' has no published row '{value['row']}'{hint}")
    return value["paper"], value["row"]


def _check_kwargs(key: str, kwargs: Dict[str, Any]) -> None:
    """Keys without a value are a typo timm would drop silently (``{patch_size:4}`` is the key ``patch_size:4``)."""
    for k, v in kwargs.items():
        if v is None:
            hint = (f"YAML needs a space after the colon: {{{str(k).replace(':', ': ', 1)}}}" if ":" in str(k)
                    else f"give it a value, e.g. {{{k}: VALUE}}, or leave it out")
            raise ConfigError(f"{key}: '{k}' has no value; {hint}")


def check_model_name(key: str, name: str) -> None:
    """A name timm (with this repository's models) does not know stops with the closest names by edit distance."""
    import timm
    import models  # noqa: F401  (registers LV-ViT and the models the methods need)

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(close)}?" if close
            else "; list the ViTs with: python -c \"import timm; print(timm.list_models('*vit*'))\"")
    raise ConfigError(f"{key}: unknown timm model '{name}'{hint}")


def _check_auto_augment(aa: Optional[str]) -> Optional[str]:
    """``aa`` is a policy timm can build (``none`` or empty: off)."""
    if aa is None or aa.strip().lower() in ("", "none"):
        return None
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=aa)
    except Exception as e:  # noqa: BLE001 -- timm rejects a policy with assertions and key errors
        raise ConfigError(f"aa: '{aa}' is not a timm auto-augment policy ({first_line(e)}); use e.g. "
                          f"rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0 or original, or null for none") from None
    return aa


def build_config(data: Dict[str, Any]) -> Config:
    return validate(_build_config(data))


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> Config:
    data = read_yaml(path) if path else {}
    return build_config(_apply_overrides(data, parse_overrides(overrides or [], bool_keys())))


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config (atomically); it loads back with ``load_config(path)``."""
    from files import write_text       # the one atomic writer
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None))
