"""Run configuration: a typed schema, YAML files that may inherit, command-line overrides, and validation.

Keys are DeiT's argparse names (``lr``, ``drop_path``, ``model_ema_decay`` ...) with DeiT's defaults, so a DeiT user
reads a config without a dictionary. Each training-acceleration method owns a section named after it (``toe:``,
``pss:`` ...): its schema and checks live in the method's package and are found through :mod:`methods`; the
top-level ``methods`` key says which sections are active (default: every section present).

    cfg = load_config("configs/deit_s_toe.yaml", ["--lr", "1e-3", "--toe.keep_rates", "[0.4,0.7,1.0]"])

Every mistake stops with one :class:`ConfigError` line that names the key and the fix: unknown keys (with the
closest valid name), wrong types, impossible values and impossible method settings.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import yaml

from methods import MethodError, method_class, registry


class ConfigError(ValueError):
    """A configuration mistake; ``str(err)`` is the one line shown to the user."""


@dataclass
class TokenLabelConfig:
    """LV-ViT token labeling: dense teacher labels from a packed store (scripts/generate_token_labels.py)."""
    data: str = "data/token_labels"            # the packed label store directory
    size: int = 14                             # token grid of the dense targets: input_size / patch size
    cls_weight: float = 1.0
    dense_weight: float = 1.0
    cls_target: str = "label_map"              # label_map | ground_truth | corrected


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------------------------
    output_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"                       # auto | cpu | cuda
    num_workers: int = 10
    pin_memory: bool = True
    print_freq: int = 20                       # iterations between plain log lines (off a terminal)
    tensorboard: bool = True
    eval: bool = False                         # evaluate `resume`/`finetune` weights and exit
    resume: str = ""                           # checkpoint to continue from ("auto": output_dir/checkpoint.pth if present)
    finetune: str = ""                         # initialise weights from a checkpoint, fresh optimizer and schedule
    save_every: int = 1                        # epochs between checkpoint.pth writes
    # --- data ------------------------------------------------------------------------------------------------
    data_set: str = "imagenet"                 # imagenet | cifar10 | cifar100 | folder | digits
    data_path: str = "data/imagenet"
    nb_classes: Optional[int] = None           # checked against the dataset; taken from it when empty
    input_size: int = 224
    # --- model -----------------------------------------------------------------------------------------------
    model: str = "deit_small_patch16_224"      # any timm ViT name
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments
    drop: float = 0.0
    drop_path: float = 0.1
    grad_checkpointing: bool = False
    compile: bool = False
    amp: str = "auto"                          # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | none
    # --- EMA -------------------------------------------------------------------------------------------------
    model_ema: bool = True
    model_ema_decay: float = 0.99996
    model_ema_eval: bool = True                # evaluate the EMA every epoch
    best_on: str = "model"                     # model | ema: whose val top-1 picks best.pth
    # --- optimisation ----------------------------------------------------------------------------------------
    epochs: int = 300
    batch_size: int = 64                       # per process; global batch = batch_size * world_size * grad_accum_steps
    grad_accum_steps: int = 1
    opt: str = "adamw"
    opt_eps: float = 1e-8
    opt_betas: Optional[List[float]] = None
    momentum: float = 0.9
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None        # layer-wise lr decay (BEiT/SimMIM fine-tuning), by timm's optimizer factory
    clip_grad: Optional[float] = None
    lr: float = 5e-4                           # for a global batch of lr_base_batch
    lr_base_batch: int = 512
    unscale_lr: bool = False                   # true: use lr as given, no scaling by the global batch
    sched: str = "cosine"                      # cosine | step | constant
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_epochs: int = 5
    decay_epochs: int = 30                     # step schedule only
    decay_rate: float = 0.1                    # step schedule only
    # --- augmentation and regularisation -------------------------------------------------------------------
    color_jitter: float = 0.3
    aa: Optional[str] = "rand-m9-mstd0.5-inc1"
    smoothing: float = 0.1
    train_interpolation: str = "bicubic"
    hflip: float = 0.5                         # horizontal-flip probability (0 for digits and text)
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])   # RandomResizedCrop area range
    repeated_aug: bool = True
    ra_repeats: int = 3
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    eval_crop_ratio: float = 0.875
    # --- knowledge distillation ------------------------------------------------------------------------------
    distillation_type: str = "none"            # none | soft | hard
    teacher_model: str = "regnety_160"
    teacher_path: str = ""                     # local checkpoint file of the teacher
    teacher_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra timm.create_model arguments
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    # --- LV-ViT token labeling ------------------------------------------------------------------------------
    token_label: Optional[TokenLabelConfig] = None
    # --- methods ---------------------------------------------------------------------------------------------
    methods: Optional[List[str]] = None        # active method sections, in order; null: every section present
    # the method sections by name (`toe:` ...), each the dataclass its method declares; written as top-level keys
    sections: Dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str):
        """``cfg.toe`` reads the method section ``toe`` (``None`` when absent) for every registered method."""
        if name.startswith("__") or name == "sections":
            raise AttributeError(name)
        if name in registry():
            return self.sections.get(name)
        raise AttributeError(f"Config has no key '{name}'")

    def active_methods(self) -> List[str]:
        """The sections this run applies, in order."""
        return list(self.sections) if self.methods is None else list(self.methods)

    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        sections = data.pop("sections")
        methods = data.pop("methods")
        data.update(sections)
        data["methods"] = methods
        return data


SECTIONS = {"token_label": TokenLabelConfig}     # sections that are not methods
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "data_set": ("imagenet", "cifar10", "cifar100", "folder", "digits"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "best_on": ("model", "ema"),
    "opt": ("adamw", "adam", "sgd", "lamb"),
    "sched": ("cosine", "step", "constant"),
    "mixup_mode": ("batch", "pair", "elem"),
    "remode": ("pixel", "rand", "const"),
    "distillation_type": ("none", "soft", "hard"),
    "token_label.cls_target": ("label_map", "ground_truth", "corrected"),
}
NON_NEGATIVE = ("seed", "layer_decay", "num_workers", "drop", "drop_path", "weight_decay", "lr", "warmup_lr", "min_lr", "warmup_epochs",
                "smoothing", "reprob", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "distillation_alpha",
                "model_ema_decay", "clip_grad", "color_jitter", "hflip")
POSITIVE = ("epochs", "batch_size", "grad_accum_steps", "input_size", "lr_base_batch", "print_freq", "save_every",
            "ra_repeats", "distillation_tau", "eval_crop_ratio", "nb_classes")


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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 5e-4, without a dot, as a string
            try:
                return float(value)
            except ValueError:
                pass
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
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else "; valid keys are listed in README.md"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
        choices = fields[key].metadata.get("choices")
        if choices is not None and kwargs[key] is not None and kwargs[key] not in choices:
            raise ConfigError(f"{prefix}{key}: '{kwargs[key]}' is not one of {', '.join(map(str, choices))}")
    return cls(**kwargs)


def _build_config(data: Dict[str, Any]) -> Config:
    """The top level: Config's own keys, plus one section per registered method (``toe:`` ...)."""
    methods = registry()
    own, sections = {}, {}
    for key, value in data.items():
        if key in methods:
            if value is not None:
                sections[key] = _coerce(value, methods[key].Config, key)
        elif key == "sections":
            raise ConfigError("unknown config key 'sections'; write each method section at the top level (e.g. toe:)")
        else:
            own[key] = value
    own_keys = [f.name for f in dataclasses.fields(Config) if f.name != "sections"]
    for key in own:
        if key not in own_keys:
            close = difflib.get_close_matches(key, own_keys + list(methods), n=1, cutoff=0.5)
            hint = ("; valid keys are listed in README.md" if not close else
                    f"; did you mean the method section '{close[0]}'?" if close[0] in methods else
                    f"; did you mean '{close[0]}'?")
            raise ConfigError(f"unknown config key '{key}'{hint}")
    cfg = _build(Config, own)
    cfg.sections = sections
    return cfg


# ------------------------------------------------------------------------------------------------ files
def read_yaml(path: str, _seen: Optional[List[str]] = None) -> Dict[str, Any]:
    """Read a config file, resolving ``base: other.yaml`` (relative to the file) by a deep merge."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    seen = (_seen or []) + [os.path.abspath(path)]
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = os.path.join(os.path.dirname(path), base)
    if os.path.abspath(base_path) in seen:
        raise ConfigError(f"{path}: 'base: {base}' makes an inheritance cycle")
    return deep_merge(read_yaml(base_path, seen), data)


def deep_merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("model_kwargs", "teacher_kwargs"):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(argv: List[str]) -> Dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--section.key value`` into a nested dict; values are read as YAML."""
    out: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides are written --key value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg} has no value: write {arg} VALUE")
            key, raw = arg[2:], argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{key} conflicts with an earlier override of --{p}")
        node[parts[-1]] = value
    return out


def _apply_overrides(data: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    data = dict(data)
    sections = set(SECTIONS) | set(registry())
    for key, value in overrides.items():
        if key in sections and isinstance(value, dict):
            current = data.get(key)
            data[key] = deep_merge(current if isinstance(current, dict) else {}, value)
        elif key in sections and (value is None or value is False
                                  or (isinstance(value, str) and value.lower() in ("none", "off", "false"))):
            data[key] = None       # --toe none: the same recipe without the method
            if key in registry() and isinstance(data.get("methods"), list) and key in data["methods"]:
                data["methods"] = [m for m in data["methods"] if m != key]
        else:
            data[key] = value
    return data


def validate(cfg: Config) -> Config:
    """Checks that need more than a type: choices, ranges, and each method section through its method."""
    flat = {k: v for k, v in cfg.to_dict().items() if k not in cfg.sections}
    for section in SECTIONS:
        sub = flat.pop(section)
        for k, v in (sub or {}).items():
            flat[f"{section}.{k}"] = v
    for key, choices in CHOICES.items():
        if key in flat and flat[key] not in choices:
            raise ConfigError(f"{key}: '{flat[key]}' is not one of {', '.join(choices)}")
    for key in NON_NEGATIVE:
        if flat.get(key) is not None and flat[key] < 0:
            raise ConfigError(f"{key}: {flat[key]} must be >= 0")
    for key in POSITIVE:
        if flat.get(key) is not None and flat[key] <= 0:
            raise ConfigError(f"{key}: {flat[key]} must be > 0")
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
    if cfg.token_label is not None:
        for key in ("mixup", "cutmix"):
            if getattr(cfg, key) > 0:
                raise ConfigError(f"{key}: must be 0 with token_label (MixToken replaces mixup and cutmix)")
        if cfg.distillation_type != "none":
            raise ConfigError("distillation_type: must be none with token_label (the dense labels are the teacher)")
        if cfg.data_set not in ("imagenet", "folder", "digits"):
            raise ConfigError(f"data_set: token_label needs an ImageFolder dataset (imagenet, folder), not {cfg.data_set}")
        if cfg.token_label.size <= 0:
            raise ConfigError(f"token_label.size: {cfg.token_label.size} must be > 0")
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
    return cfg


def build_config(data: Dict[str, Any]) -> Config:
    return validate(_build_config(data))


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> Config:
    data = read_yaml(path) if path else {}
    return build_config(_apply_overrides(data, parse_overrides(overrides or [])))


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config; it loads back with ``load_config(path)``."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
