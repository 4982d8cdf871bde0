"""Reading tar shards in the webdataset layout (``--data shards:DIR``) with an exact, resumable epoch plan.

A shard is a plain tar file; a sample is the run of consecutive members that share a key (``000123.jpg`` and
``000123.cls``: the image, and the class index as ASCII text), as webdataset writes and reads them. ``mae prepare``
writes the shards and an ``index.json`` (shards, sample counts, class names per split); see `mae.data.shard_writer`.

Why not the ``webdataset`` package for reading: its pipeline is a stream, and by its own documentation it cannot
restart exactly in the middle of an epoch. Here the epoch is planned up front, from the sample counts, as a list
of global sample indices per rank and batch, and each sample is read by seeking to its bytes (the member table of
a shard comes from its tar headers, read once per process). So:

- the order is a pure function of (seed, epoch): a shuffled shard order, a cyclic shift of the resulting stream,
  and a bounded shuffle buffer, all drawn from a generator seeded by (seed, epoch) (the buffer is simulated on
  indices, so no byte is read to know the order);
- ranks take equal contiguous runs of that stream (rank r of R: positions r*M ... (r+1)*M - 1, M = K x batch), so
  every sample is seen at most once per epoch and every rank runs the same K batches;
- ``set_epoch(epoch, skip=k)`` starts at batch k without reading, let alone decoding, batches 0 ... k-1;
- each sample's augmentation and masking noise come from RNGs (torch, ``random``, numpy) seeded by a hash of
  (seed, epoch, global sample index), as `SeededDataset` + `WithMaskNoise` do for folders: batch j holds the same
  pixels with 0 or N DataLoader workers, and after a resume.

Shards must be files (local or a network file system): the reader seeks. The bounded shuffle buffer keeps reads
local: at any time a worker reads from the one or two shards around its place in the stream.

Modules: `index` (which shards: an ``index.json`` or a brace pattern), `members` (a shard's member table, from its
tar headers), `dataset` (random access to samples), `plan` (the epoch plan), `loader` (the resumable loader).
"""

from mae.data.shards.dataset import ShardDataset, build_shard_dataset
from mae.data.shards.index import INDEX_NAME, SHARDS_PREFIX, ShardSet, expand_braces, is_shard_spec, resolve_shards
from mae.data.shards.loader import ShardLoader, build_shard_loader
from mae.data.shards.plan import plan_epoch

__all__ = ["INDEX_NAME", "SHARDS_PREFIX", "ShardDataset", "ShardLoader", "ShardSet", "build_shard_dataset",
           "build_shard_loader", "expand_braces", "is_shard_spec", "plan_epoch", "resolve_shards"]
