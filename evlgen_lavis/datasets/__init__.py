"""Dataset builders and datasets that LAVIS lacks.

Builders (registered on import): ``local_caption`` and ``local_vqa`` (local annotation JSON, never
download), ``easy_vqa_caption`` and ``easy_vqa_vqa`` (the easy-vqa package, prepared on first use).
Our datasets skip unreadable images and report them per batch (see :mod:`.skipping`); frozen-encoder
features can replace images (see :mod:`.feature_cache`).
"""
from evlgen_lavis.datasets.builders import (  # noqa: F401
    LocalCaptionBuilder,
    LocalVQABuilder,
    MissingDataError,
    resolve_storage,
)
from evlgen_lavis.datasets.caption import LocalCaptionDataset, LocalCaptionEvalDataset  # noqa: F401
from evlgen_lavis.datasets.easyvqa import (  # noqa: F401
    EasyVQACaptionBuilder,
    EasyVQAVQABuilder,
    derive_captions,
    prepare_easy_vqa,
)
from evlgen_lavis.datasets.feature_cache import CachedFeatureDataset, build_feature_cache  # noqa: F401
from evlgen_lavis.datasets.skipping import (  # noqa: F401
    SkipAwareConcatDataset,
    SkipCounter,
    TooManySkippedError,
    concat_datasets,
    skip_collate,
)
from evlgen_lavis.datasets.vqa import LocalVQADataset, LocalVQAEvalDataset  # noqa: F401
from evlgen_lavis.datasets.paper import CCS14MBuilder, Laion115MBuilder, WebImageTextDataset  # noqa: F401
from evlgen_lavis.datasets.video import LocalVideoCaptionDataset, LocalVideoCaptionEvalDataset  # noqa: F401,E402
