"""Carrying a kept leaf as stored: its zarr chunks copied from the input's database into the output's, neither decoded
nor encoded again.

A merge leaves 37% of pi0's bytes as they are (SigLIP, the embedder, projections, norms). When the output array that
Orbax's save opens for such a leaf has the input's zarr metadata (dtype, shape, chunks, codec and its level, fill
value, order, filters, key separator), the input's stored chunks are, byte for byte, a valid encoding of the output,
decoding to the same array: copying them saves TensorStore's encode of those bytes.

Contract:
- ``carriable(source, target)``: whether ``target`` (an output TensorStore opened by ``writer.slices``) stores what
  ``source`` (the input's, ``reader.Inputs``) stores in the same encoding, over the same kvstore driver. False for any
  difference, including an input written by another Orbax release with other defaults: such a leaf is re-encoded.
- ``copy(source, target)``: starts copying every stored chunk key of ``source``'s array into ``target``'s (the zarr
  metadata key is Orbax's own: it wrote it when it opened ``target``); returns a Future of the bytes copied, done
  once every write is. A chunk the input does not store (all fill value) is not stored in the output either, as
  TensorStore would not store it when writing. The future raises what TensorStore raises for a failed read or write
  (ValueError, OSError); a damaged chunk is found before the copy by the decoded read that the manifest's digest
  takes of the same array (``stream``), which raises InputError naming the parameter.

The manifest still hashes the decoded array (``manifest.Digests``): ``mode=check`` on either stack verifies a carried
leaf as it verifies any other, and a flipped byte in a carried chunk fails its decode or its digest there.
"""

import concurrent.futures

import tensorstore as ts

_METADATA_KEYS = (b".zarray", b".zattrs", b"zarr.json")  # zarr v2 and v3 metadata: written by Orbax's open.
# One thread copies, a leaf at a time: the bytes come from the page cache and go to TensorStore's async writes.
_COPIER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="openpi-merge-carry")


def _metadata(store: ts.TensorStore) -> dict:
    return store.spec().to_json().get("metadata", {})


def _driver(store: ts.TensorStore) -> str | None:
    return store.kvstore.spec().to_json().get("driver")


def carriable(source: ts.TensorStore, target: ts.TensorStore) -> bool:
    """Whether ``source``'s stored chunks are ``target``'s encoding as they are (module docstring)."""
    metadata = _metadata(source)
    return bool(metadata) and metadata == _metadata(target) and _driver(source) == _driver(target)


def copy(source: ts.TensorStore, target: ts.TensorStore) -> concurrent.futures.Future:
    """Starts copying ``source``'s stored chunks into ``target`` (module docstring); the future gives the bytes."""
    src, dst = source.kvstore, target.kvstore

    def run() -> int:
        # One transaction per leaf: one new version of the output's database, as a TensorStore write of the whole
        # array makes, not one per chunk key (each a b-tree version that the final one supersedes).
        transaction = ts.Transaction()
        staged, copied = dst.with_transaction(transaction), 0
        for key in src.list().result():
            if key.rsplit(b"/", 1)[-1] in _METADATA_KEYS:
                continue
            value = src.read(key).result().value
            copied += len(value)
            staged.write(key, value)
        transaction.commit_async().result()
        return copied

    return _COPIER.submit(run)
