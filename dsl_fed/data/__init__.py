"""Data layer: manifests, audio decoding, chunking, speaker shards, tf.data pipelines and the demo corpus.

TensorFlow is imported only when a dataset is built, so the data CLI commands start quickly.
"""

from dsl_fed.data.audio import SUPPORTED_EXTENSIONS, load_audio
from dsl_fed.data.chunking import chunk_signal, count_chunks, normalise_chunks
from dsl_fed.data.demo import make_demo_corpus
from dsl_fed.data.manifest import PARTITIONS, Clip, Manifest, load_manifest, read_manifest, split_speakers
from dsl_fed.data.partition import partition_speakers, shard_clips
from dsl_fed.data.pipeline import ChunkSet, load_chunks, make_dataset

__all__ = [
    "PARTITIONS",
    "SUPPORTED_EXTENSIONS",
    "ChunkSet",
    "Clip",
    "Manifest",
    "chunk_signal",
    "count_chunks",
    "load_audio",
    "load_chunks",
    "make_dataset",
    "make_demo_corpus",
    "normalise_chunks",
    "partition_speakers",
    "load_manifest",
    "read_manifest",
    "shard_clips",
    "split_speakers",
]
