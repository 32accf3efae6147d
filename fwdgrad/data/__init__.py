"""fwdgrad.data: datasets for fine-tuning with forward gradients, offline first.

Entry point: ``build_dataset(name, root=None, seed=0, **options) -> DataSplits`` with ``name`` one of
``digits``, ``fashion_mnist``, ``fashion_mnist_c``, ``synth_keywords``, ``cifar10``, ``cifar100``,
``cifar10_c``, ``svhn``, ``omniglot``, ``speechcommands``, ``esc50`` (``DATASETS``); ``dataset_options(name)``
lists each one's options and defaults. ``DataSplits`` holds ``train``/``test`` datasets, ``classes``,
``synthetic`` and ``info``. See docs/data.md.

Building blocks: the 8x8 digits (:mod:`.digits`), Fashion-MNIST from Debian's IDX files
(:mod:`.fashion`), CIFAR-10-C-style corruptions (:mod:`.corruptions`, :mod:`.c_benchmark`), synthetic
eSpeak NG keywords (:mod:`.keywords`, :mod:`.espeak`, :mod:`.features`), real torchvision/torchaudio
loaders (:mod:`.vision`, :mod:`.audio`), few-shot episodes and heads (:mod:`.episodes`, :mod:`.heads`).
"""

from fwdgrad.data.audio import SPEECH_COMMANDS_WORDS, AudioClips, load_esc50, load_speechcommands
from fwdgrad.data.c_benchmark import (
    CIFAR10_C_CORRUPTIONS,
    adaptation_split,
    load_cifar10_c,
    make_fashion_mnist_c,
)
from fwdgrad.data.corruptions import CORRUPTIONS, LEVELS, corrupt, resolve_severity
from fwdgrad.data.digits import digits_split, load_digits_tensors
from fwdgrad.data.episodes import Episode, episodes, sample_episode
from fwdgrad.data.errors import DatasetCorrupted, DatasetNotFound
from fwdgrad.data.espeak import EspeakUnavailable, list_voices
from fwdgrad.data.fashion import DEBIAN_FASHION_DIR, load_fashion_mnist, prepare_fashion_mnist
from fwdgrad.data.features import compute_features, log_mel_transform, mfcc_transform
from fwdgrad.data.heads import accuracy, protonet_logits, prototypes, simpleshot_logits, simpleshot_transform
from fwdgrad.data.keywords import (
    CORE_WORDS,
    DEFAULT_VOICES,
    DIGIT_WORDS,
    FEWSHOT_WORDS,
    KeywordConfig,
    generate_keywords,
    keyword_cache,
    load_keywords,
    read_manifest,
)
from fwdgrad.data.registry import DATASETS, DataSplits, build_dataset, dataset_options, default_root
from fwdgrad.data.splits import class_subset, class_subset_split, stratified_split
from fwdgrad.data.vision import load_cifar, load_omniglot, load_svhn

__all__ = [
    "AudioClips",
    "CIFAR10_C_CORRUPTIONS",
    "CORE_WORDS",
    "CORRUPTIONS",
    "DATASETS",
    "DEBIAN_FASHION_DIR",
    "DEFAULT_VOICES",
    "DIGIT_WORDS",
    "DataSplits",
    "DatasetCorrupted",
    "DatasetNotFound",
    "Episode",
    "EspeakUnavailable",
    "FEWSHOT_WORDS",
    "KeywordConfig",
    "LEVELS",
    "SPEECH_COMMANDS_WORDS",
    "accuracy",
    "adaptation_split",
    "build_dataset",
    "class_subset",
    "class_subset_split",
    "compute_features",
    "corrupt",
    "dataset_options",
    "default_root",
    "digits_split",
    "episodes",
    "generate_keywords",
    "keyword_cache",
    "list_voices",
    "load_cifar",
    "load_cifar10_c",
    "load_digits_tensors",
    "load_esc50",
    "load_fashion_mnist",
    "load_keywords",
    "load_omniglot",
    "load_speechcommands",
    "load_svhn",
    "log_mel_transform",
    "make_fashion_mnist_c",
    "mfcc_transform",
    "prepare_fashion_mnist",
    "protonet_logits",
    "prototypes",
    "read_manifest",
    "resolve_severity",
    "sample_episode",
    "simpleshot_logits",
    "simpleshot_transform",
    "stratified_split",
]
