"""Data sources: image folders, manifests, WebDataset shards and Fashion-MNIST, with loaders that skip bad files.

See ``docs/core.md`` ("Data sources") for the spec-string grammar and the loader contract.
"""

from dinoforge.core.data.arrow_manifest import ArrowManifestSource, convert_manifest
from dinoforge.core.data.base import DataSource, IndexedSource, SampleOrBad, StreamingSource
from dinoforge.core.data.fmnist import FASHION_MNIST_CLASSES, FashionMNISTSource, load_fashion_mnist, read_idx
from dinoforge.core.data.folder import IMAGE_EXTENSIONS, ImageFolderSource
from dinoforge.core.data.loader import (ImageBatch, Preprocess, SkippingLoader, SkipStats, collate_images,
                                        image_batches, iter_good, map_source)
from dinoforge.core.data.manifest import ManifestSource, open_manifest, read_manifest_table
from dinoforge.core.data.order import EpochOrder, RankSampler
from dinoforge.core.data.sample import UNLABELLED, BadSample, Record, Sample
from dinoforge.core.data.spec import SCHEMES, SourceSpec, open_source, parse_spec
from dinoforge.core.data.subset import (ConcatSource, SubsetSource, TakeSource, holdout_split, random_subset,
                                        shuffled, slice_source, stratified_subset)
from dinoforge.core.data.webdataset import WebDatasetSource, expand_braces

__all__ = [
    "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "ArrowManifestSource", "EpochOrder", "RankSampler",
    "convert_manifest", "open_manifest", "SCHEMES", "UNLABELLED", "BadSample", "ConcatSource", "DataSource",
    "FashionMNISTSource", "ImageBatch", "ImageFolderSource", "IndexedSource", "ManifestSource", "Preprocess",
    "Record", "Sample", "SampleOrBad", "SkipStats", "SkippingLoader", "SourceSpec", "StreamingSource",
    "SubsetSource", "TakeSource", "WebDatasetSource", "collate_images", "expand_braces", "holdout_split",
    "image_batches", "iter_good", "load_fashion_mnist", "map_source", "open_source", "parse_spec",
    "random_subset", "read_idx", "read_manifest_table", "shuffled", "slice_source", "stratified_subset",
]
