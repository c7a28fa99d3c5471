"""Runs: generation of large sample sets over seeds and ranks, their durable outputs (atomic
files, byte-stable encodings, shards and manifest), resume and merge."""
from .generation import (QUANTIZERS, GeneratedBatch, NonFiniteSampleError, draw_latents_and_labels, generate,
                         quantize_floor, quantize_round, rank_batches, run_config, run_generation)
from .merge import ShardMergeError, merge_npz_shards
from .run_config import RunConfigMismatchError
from .seeds import parse_seeds

__all__ = ["QUANTIZERS", "GeneratedBatch", "NonFiniteSampleError", "RunConfigMismatchError", "ShardMergeError",
           "draw_latents_and_labels", "generate", "merge_npz_shards", "parse_seeds", "quantize_floor",
           "quantize_round", "rank_batches", "run_config", "run_generation"]
