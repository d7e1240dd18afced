"""The settings of every training command, declared once (no torch here: the CLI reads the defaults).

Each dataclass's defaults are the shipped recipe of its role: ``cervscan train-*`` takes its option
defaults from these classes (an option left out keeps the dataclass default), and ``scripts/train_shipped.sh``
names the settings that are not defaults (data paths, threads, versions, caches).

- :class:`DecisionTrainConfig`: ``train-cls --recipe frozen`` (the default recipe of the classifier role).
- :class:`ClsTrainConfig`: ``train-cls --recipe finetune`` (end-to-end fine-tuning).
- :class:`SegTrainConfig`: ``train-seg``; ``--target`` picks the lesion segmenter's or the cervix finder's
  defaults (:data:`SEG_TARGET_DEFAULTS`).
- :class:`StageTrainConfig`: ``train-stage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cervscan.config import DEFAULT_BRIGHTNESS, STUDY_WEIGHTS, VARIANT_SETS
from cervscan.errors import CervscanError

#: The classifier role's recipes: frozen ImageNet features + a regression (the shipped one), or fine-tuning.
RECIPES = ("frozen", "finetune")
BACKBONES = ("lite0", "lite1", "lite2")
#: what a segmenter finds; recorded in its checkpoint as ``target``
TARGETS = ("lesion", "cervix")
ANNOCERV_GROUP_REGEX = r"^(C\d+)"
#: The segmenter's encoder (equal to :data:`cervscan.models.networks.DEFAULT_SEG_ENCODER`, which a test checks).
SEG_ENCODER = "tu-tf_efficientnet_lite0"


@dataclass
class DecisionTrainConfig:
    """``train-cls --recipe frozen``; the defaults are the shipped classifier's recipe."""

    visits: str
    labels: str
    out: str
    backbone: str = "lite0"
    input_size: int = 384
    #: The classifier's original views: "crop" (the cervix crop) or "frame" (the whole image).
    classify_view: str = "frame"
    #: Variants scored at screening (their weights: ``weights``, renormalised over these).
    variants: tuple[str, ...] = VARIANT_SETS["original+segmented"]
    weights: tuple[float, ...] = STUDY_WEIGHTS
    #: Variants whose patient features are training rows (the study trains on original + segmented).
    train_variants: tuple[str, ...] = ("original", "segmented")
    decision_stages: tuple[str, ...] = ("acetic",)
    #: False: every image of a deciding stage counts, whatever its quality (to measure the gate's effect).
    quality_gate: bool = True
    C: float = 0.01
    folds: int = 5
    repeats: int = 3
    seed: int = 0
    target_sensitivity: float = 0.90
    seg_model: str | None = None
    cervix_model: str | None = None
    stage_model: str | None = None
    cache_dir: str | None = None
    threads: int = 0
    name: str = "cervscan-decision-lite0"
    version: str = "0.0.0-local"
    #: Write model.pt even when the classifier fails its validation (recorded as ``forced`` in it).
    force: bool = False
    n_bootstrap: int = 2000


@dataclass
class ClsTrainConfig:
    """``train-cls --recipe finetune``: a timm network fine-tuned on original + segmented images."""

    visits: str
    labels: str
    out: str
    seg_model: str | None = None
    images_csv: str | None = None
    arch: str = "repvgg_a0"
    pretrained: bool = False
    samples: str = "both"  # both | original | segmented
    epochs: int = 12
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    input_size: int = 224
    val_fraction: float = 0.2
    folds: int = 0
    full: bool = False
    target_sensitivity: float = 0.90
    tune_votes: bool = False
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    threads: int = 0
    max_steps_per_epoch: int = 0
    cache_dir: str | None = None
    name: str = "cervscan-cls"
    version: str = "0.0.0-local"
    brightness: float = DEFAULT_BRIGHTNESS
    head_std: float = 0.0  # > 0: re-initialise the classification head ~ N(0, head_std), bias 0 (0 keeps timm's init)
    eval_epochs: tuple[int, ...] = ()  # also score the held-out patients after these epochs (learning curve)
    #: what the classifier sees (as screening will): "cervix" (cervix finder crop), "centre" or "frame"
    crop: str = "cervix"
    cervix_model: str | None = None
    #: train and score only these folds (1-based; 0 = the all-patient model), for running folds in parallel
    only_folds: tuple[int, ...] = ()
    #: write model.pt even when the classifier fails its validation (recorded as ``forced`` in it)
    force: bool = False


@dataclass
class SegTrainConfig:
    """``train-seg``; the defaults are the shipped lesion segmenter's (``--target cervix``: :data:`SEG_TARGET_DEFAULTS`)."""

    data: str
    out: str
    encoder: str = SEG_ENCODER
    pretrained: bool = True
    init: str | None = None
    input_size: int = 256
    epochs: int = 24
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    group_regex: str = ANNOCERV_GROUP_REGEX
    seed: int = 0
    resume: bool = False
    threads: int = 0
    channels_last: bool = True
    max_steps_per_epoch: int = 0  # 0 = all; >0 for smoke tests
    stop_after: int = 0  # stop after this epoch (learning-rate schedule still planned for `epochs`); resume later
    name: str = "cervscan-lesion-unetpp-lite0"
    version: str = "0.0.0-local"
    extra_notes: dict = field(default_factory=dict)
    #: what the masks show: "lesion" (acetowhite lesion) or "cervix" (region of interest)
    target: str = "lesion"
    #: colour augmentation strength (brightness, contrast, saturation; hue is a quarter of it)
    color_jitter: float = 0.25
    #: CSV with ``image,split[,kind]``: given splits are kept, ``kind=open`` rows left out
    images_csv: str | None = None
    #: cervix finder checkpoint: images and masks are cropped to the cervix as screening does
    crop_cervix: str | None = None


#: The shipped recipe of each segmenter target where it differs from :class:`SegTrainConfig`'s defaults
#: (the cervix finder: 192 px, 30 epochs, stronger colour augmentation for the flash-card images).
SEG_TARGET_DEFAULTS: dict[str, dict] = {
    "lesion": {},
    "cervix": {"input_size": 192, "epochs": 30, "color_jitter": 0.4, "name": "cervscan-cervix-unetpp-lite0"},
}


@dataclass
class StageTrainConfig:
    """``train-stage``; the defaults are the shipped stage model's recipe."""

    visits: str
    out: str
    images_csv: str | None = None  # default VISITS/images.csv
    folds: int = 5
    seed: int = 0
    C: float = 0.01
    cache_dir: str | None = None
    threads: int = 0
    name: str = "cervscan-stage-lite0"
    version: str = "0.0.0-local"


_R = DecisionTrainConfig  # the frozen classifier recipe, whose defaults adapt keeps


@dataclass
class AdaptConfig:
    """``cervscan adapt``: the patient decision made a site's own from its labelled visits
    (:mod:`cervscan.training.adapt`). The classifier settings are the frozen recipe's
    (:class:`DecisionTrainConfig`); the rest says how the site's data are checked and used."""

    visits: str
    labels: str
    out: str
    #: Models that screen the local visits (None: installed, else shipped); ``cls_model``: the decision the
    #: adapted one is compared with (None: the installed one).
    seg_model: str | None = None
    cervix_model: str | None = None
    stage_model: str | None = None
    cls_model: str | None = None
    target_sensitivity: float = _R.target_sensitivity
    #: Exam stages that decide; None: chosen by the selection rule between the installed classifier's and every
    #: stage (:mod:`cervscan.training.adapt_candidates`; every candidate is measured and recorded either way).
    decision_stages: tuple[str, ...] | None = None
    #: Quality gate thresholds: "auto" (chosen by the rule), "site" (re-derived from the local originals by the
    #: shipped rule) or "installed".
    gate: str = "auto"
    #: False rejects the re-derived quality gate may make on the local originals (the shipped rule's budget).
    false_reject_budget: float = 0.05
    #: "auto": chosen by the rule between local-only and pooled (local + the shipped training patients'
    #: features); "local" or "pooled": that one.
    pool: str = "auto"
    #: The selection rule: a candidate leaving more than ``max_inadequate`` of the local patients inadequate is
    #: not chosen (unless all do); candidates within ``choice_margin`` AUC of the best are tied, and the tie goes
    #: to the one departing least from the installed settings.
    max_inadequate: float = 0.10
    choice_margin: float = 0.01
    #: Nested cross-validation of the choice (the run's AUC estimate); False: only the chosen one's own CV AUC.
    nested: bool = True
    #: The shipped training patients' features (None: ``classifier-training-features.npz`` of the weights).
    training_features: str | None = None
    #: Fewer patients than this in a class: refused unless ``force``; fewer than ``warn_per_class``: a warning.
    min_per_class: int = 10
    warn_per_class: int = 30
    #: Learning curve: local training patients drawn ``curve_draws`` times per size, scored on the rest.
    curve_sizes: tuple[int, ...] = (10, 20, 40)
    curve_draws: int = 20
    backbone: str = _R.backbone
    input_size: int = _R.input_size
    classify_view: str = _R.classify_view
    variants: tuple[str, ...] = _R.variants
    weights: tuple[float, ...] = _R.weights
    train_variants: tuple[str, ...] = _R.train_variants
    C: float = _R.C
    folds: int = _R.folds
    repeats: int = _R.repeats
    seed: int = _R.seed
    n_bootstrap: int = _R.n_bootstrap
    cache_dir: str | None = None
    threads: int = 0
    name: str = "cervscan-decision-site"
    version: str = "0.0.0-site"
    #: Go on with too few patients, and write model.pt although the adapted decision fails its validation
    #: (both recorded, and said on the card).
    force: bool = False

    def recipe(self, decision_stages: tuple[str, ...], **given) -> DecisionTrainConfig:
        """The frozen recipe's settings of this run, with ``decision_stages``."""
        own = {f.name for f in fields(DecisionTrainConfig)}
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name in own and f.name != "decision_stages"}
        return DecisionTrainConfig(**{**kw, "decision_stages": tuple(decision_stages), **given})


def default(cls, name: str):
    """The declared default of ``cls``'s field ``name`` (for option defaults and help texts)."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def seg_config(**given) -> SegTrainConfig:
    """A :class:`SegTrainConfig` from the options given: what is not given is the target's shipped default."""
    target = given.get("target") or SegTrainConfig.target
    return SegTrainConfig(**{**SEG_TARGET_DEFAULTS.get(target, {}), **given})


#: The classifier role's recipe -> its settings.
RECIPE_CONFIGS = {"frozen": DecisionTrainConfig, "finetune": ClsTrainConfig}


def classifier_config(recipe: str = "frozen", **given):
    """The ``train-cls`` settings of ``recipe`` from the options given (the rest: the recipe's defaults). A setting
    that only the other recipe has is refused, naming it, rather than silently ignored."""
    if recipe not in RECIPE_CONFIGS:
        raise CervscanError(f"--recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    cls = RECIPE_CONFIGS[recipe]
    own = {f.name for f in fields(cls)}
    other = sorted(k for k in given if k not in own)
    if other:
        names = ", ".join("--" + k.replace("_", "-") for k in other)
        raise CervscanError(f"{names}: not a setting of --recipe {recipe} (see 'cervscan train-cls --help')")
    return cls(**given)
