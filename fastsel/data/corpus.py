"""Corpora larger than memory: a tokenised Arrow cache, length-bucketed batch schedules, a prefetching reader.

The examples of a split are tokenised once with ``datasets.Dataset.map(batched=True)`` into an Arrow file
under a cache folder (``$FASTSEL_CACHE``, default ``~/.cache/fastsel``) keyed by the data source, the
subsampling and the tokenizer; later runs memory-map that file and never touch the text again. Every row
keeps ``index``, its position in the (subsampled) split: it keys the sampled Fisher labels, the shards of
a multi-process run, and the resume position.

A *batch schedule* is a list of index arrays fixed before the pass (deterministic: same data, same schedule), so
that a run can stop at any batch and resume, and so that ranks can split the batches without talking:

- ``bucket=True`` sorts the examples by length (stable) before cutting batches, so that a batch pads to
  nearly its own length; batch *order* is then shuffled with the seed (a uniform ETA, no long tail).
- ``max_tokens`` cuts a batch when ``(examples + 1) * longest`` would exceed the budget of padded tokens;
  otherwise batches have ``batch_size`` examples.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from fastsel.data.features import FEATURE_KEYS, PadCollator
from fastsel.data.readers import DataSource, canonical_split, examples_for, resolve_file
from fastsel.data.specs import TaskSpec, get_task

__all__ = [
    "cache_root",
    "TokenizedCorpus",
    "load_tokenized_corpus",
    "schedule_batches",
    "shard_batches",
    "padding_stats",
    "BatchReader",
    "batch_to_device",
]

_CACHE_VERSION = 1


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the tokenised Arrow caches: ``cache_dir``, else $FASTSEL_CACHE, else ~/.cache/fastsel."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("FASTSEL_CACHE", Path.home() / ".cache" / "fastsel")).expanduser() / "corpora"


# --------------------------------------------------------------------------------------------------
# The tokenised corpus (Arrow, memory-mapped)
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizedCorpus:
    """A memory-mapped tokenised split: ``dataset`` rows hold the features, ``labels``, ``index``, ``length``."""

    dataset: Any  # datasets.Dataset
    task: TaskSpec
    key: str  # content key of the cache (data source, subsampling, tokenizer, max_length)
    path: Path | None

    def __len__(self) -> int:
        return len(self.dataset)

    def lengths(self) -> np.ndarray:
        """(N,) int64 token counts, read from the Arrow column (no Python objects per row)."""
        return self.dataset.data.column("length").to_numpy().astype(np.int64)

    def labels(self) -> np.ndarray:
        return self.dataset.data.column("labels").to_numpy()


def _source_identity(cfg: DataSource) -> dict[str, Any]:
    """What identifies the raw data of a ScoreConfig without reading it (path, size, mtime)."""

    if cfg.task == "custom":
        path = Path(cfg.data_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"custom data file {str(path)!r} does not exist")
        src: dict[str, Any] = {"file": str(path.resolve()), "text_fields": list(cfg.text_fields),
                               "label_field": cfg.label_field, "regression": cfg.regression}
    else:
        spec = get_task(cfg.task)
        split = canonical_split(cfg.split)
        if cfg.data_dir is None:
            return {"hub": spec.name, "split": split}
        path = resolve_file(spec, Path(cfg.data_dir).expanduser(), split)
        src = {"task": spec.name, "split": split, "file": str(path.resolve())}
    st = path.stat()
    src.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return src


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time state that the last __call__ left behind
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.padding_side}|{text}".encode()).hexdigest()


def corpus_key(cfg: DataSource, tokenizer) -> str:
    """Content key of the tokenised corpus of ``cfg`` (a ScoreConfig) under ``tokenizer``."""
    ident = {
        "version": _CACHE_VERSION,
        "source": _source_identity(cfg),
        "num_examples": cfg.num_examples,
        "balanced": cfg.balanced,
        "seed": cfg.seed if cfg.num_examples is not None else None,
        "max_length": cfg.max_length,
        "tokenizer": _tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def _task_to_json(task: TaskSpec) -> dict[str, Any]:
    return {"name": task.name, "benchmark": task.benchmark, "num_labels": task.num_labels,
            "label_names": list(task.label_names), "metrics": list(task.metrics)}


def _task_from_json(d: dict[str, Any]) -> TaskSpec:
    return TaskSpec(d["name"], d["benchmark"], int(d["num_labels"]), tuple(d["label_names"]), tuple(d["metrics"]))


def _build(cfg: DataSource, tokenizer, final: Path) -> None:
    """Read the split, tokenise it with datasets.map into ``final`` (a folder), atomically (tmp + rename)."""
    import datasets

    examples = examples_for(cfg)
    if len(examples) == 0:
        raise ValueError(f"fastsel: no examples in {cfg.task}/{cfg.split}")
    task = examples.task
    columns: dict[str, list] = {"text_a": examples.text_a, "labels": examples.labels, "index": list(range(len(examples)))}
    if examples.text_b is not None:
        columns["text_b"] = examples.text_b
    raw = datasets.Dataset.from_dict(columns)
    del examples, columns

    label_type = datasets.Value("float32" if task.is_regression else "int64")
    probe = tokenizer(["a"], truncation=True, max_length=cfg.max_length, return_special_tokens_mask=True)
    keys = [k for k in FEATURE_KEYS if k in probe]
    if "special_tokens_mask" not in keys:
        raise ValueError("tokenizer did not return special_tokens_mask")
    feats = datasets.Features({
        **{k: datasets.Sequence(datasets.Value("int32" if k == "input_ids" else "int8")) for k in keys},
        "labels": label_type, "index": datasets.Value("int64"), "length": datasets.Value("int32"),
    })
    pair = "text_b" in raw.column_names

    def encode(rows: dict[str, list]) -> dict[str, list]:
        args = (rows["text_a"], rows["text_b"]) if pair else (rows["text_a"],)
        enc = tokenizer(*args, truncation=True, max_length=cfg.max_length, return_special_tokens_mask=True)
        out = {k: enc[k] for k in keys}
        out["labels"], out["index"] = rows["labels"], rows["index"]
        out["length"] = [len(x) for x in enc["input_ids"]]
        return out

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        arrow = tmp / "data.arrow"
        raw.map(encode, batched=True, batch_size=1000, remove_columns=raw.column_names, features=feats,
                cache_file_name=str(arrow), writer_batch_size=10000, desc="tokenising", load_from_cache_file=False)
        (tmp / "task.json").write_text(json.dumps(_task_to_json(task)))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first
            if not (final / "task.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """An exclusive lock (``flock`` on ``.<key>.lock`` beside the cache) while one process builds a corpus cache.

    The build itself is atomic (temporary folder + rename) even without it; the lock only saves the second
    process from tokenising the same data again. Released by the kernel if its holder dies.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone keeps the cache whole
        yield
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def load_tokenized_corpus(cfg: DataSource, tokenizer, cache_dir: str | os.PathLike | None = None, build: bool = True) -> TokenizedCorpus:
    """The tokenised corpus of ``cfg`` (ScoreConfig), built on first use and memory-mapped afterwards."""
    import datasets

    key = corpus_key(cfg, tokenizer)
    final = cache_root(cache_dir) / key
    if not (final / "task.json").is_file():
        if not build:
            raise FileNotFoundError(f"fastsel: corpus cache {final} missing")
        with _build_lock(final):  # a second run building the same cache waits, then reads the first one's
            if not (final / "task.json").is_file():
                _build(cfg, tokenizer, final)
    task = _task_from_json(json.loads((final / "task.json").read_text()))
    with _quiet_datasets():
        ds = datasets.Dataset.from_file(str(final / "data.arrow"))  # memory-mapped
    if len(ds) == 0:
        raise ValueError(f"fastsel: no examples in {cfg.task}/{cfg.split}")
    return TokenizedCorpus(ds, task, key, final)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------------
# Batch schedules
# --------------------------------------------------------------------------------------------------


def schedule_batches(
    lengths: np.ndarray, *, batch_size: int, max_tokens: int | None = None, bucket: bool = True, seed: int = 0
) -> list[np.ndarray]:
    """Cut rows 0..N-1 into batches: a list of int64 index arrays (every row exactly once).

    lengths (N,) token counts. ``bucket`` sorts rows by length (stable) first and then shuffles the
    batch order with ``seed``; without it rows stay in data order. ``max_tokens`` bounds the padded size
    ``len(batch) * max(lengths[batch])`` (a row longer than the budget gets a batch of its own);
    otherwise each batch has ``batch_size`` rows.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"fastsel: batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"fastsel: max_tokens must be >= 1, got {max_tokens}")
    n = lengths.shape[0]
    order = np.argsort(lengths, kind="stable") if bucket else np.arange(n, dtype=np.int64)
    batches: list[np.ndarray] = []
    if max_tokens is None:
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    else:
        start, longest = 0, 0
        for pos in range(n):
            l = int(lengths[order[pos]])
            if pos > start and (pos - start + 1) * max(longest, l) > max_tokens:
                batches.append(order[start:pos])
                start, longest = pos, 0
            longest = max(longest, l)
        if start < n:
            batches.append(order[start:n])
    if bucket:
        perm = np.random.default_rng(seed).permutation(len(batches))
        batches = [batches[i] for i in perm]
    return [b.astype(np.int64) for b in batches]


def shard_batches(batches: Sequence[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """Rank ``rank``'s share of a schedule: batches rank, rank + K, ... (disjoint, deterministic, balanced)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"fastsel: rank {rank} outside 0..{world_size - 1}")
    return list(batches[rank::world_size])


def padding_stats(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> dict[str, float]:
    """{'tokens': real tokens, 'padded_tokens': tokens after padding, 'padding_fraction'} of a schedule."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = int(sum(int(lengths[b].sum()) for b in batches))
    padded = int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
    return {"tokens": real, "padded_tokens": padded, "padding_fraction": 1.0 - real / padded if padded else 0.0}


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of :class:`BatchReader` on ``device`` (non-blocking from pinned memory), except ``index``: the example
    positions stay on the host, so that groups and sampled labels are read from them without a device sync."""
    return {k: v if k == "index" else v.to(device, non_blocking=True) for k, v in batch.items()}


class BatchReader:
    """Iterate padded batches of a schedule from a memory-mapped corpus, ``prefetch`` batches ahead.

    Yields dicts: input_ids (B, T), attention_mask (B, T), token_type_ids, special_tokens_mask, labels (B,)
    and ``index`` (B,) int64 (global positions). Batch ``start`` of the schedule comes first (resume).
    A background thread reads and pads the next batches while the model runs (Arrow slicing and the
    padding copies release the GIL for most of their time); ``prefetch=0`` reads inline.
    """

    def __init__(self, corpus: TokenizedCorpus, tokenizer, batches: Sequence[np.ndarray], *, start: int = 0,
                 prefetch: int = 2, pin_memory: bool = False) -> None:
        self.dataset = corpus.dataset
        self.collate = PadCollator(tokenizer)
        self.batches = batches
        self.start = start
        self.prefetch = prefetch
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def read(self, i: int) -> dict[str, torch.Tensor]:
        rows = self.dataset[self.batches[i].tolist()]
        keys = [k for k in FEATURE_KEYS if k in rows]
        features = [{**{k: rows[k][j] for k in keys}, "labels": rows["labels"][j]} for j in range(len(rows["index"]))]
        batch = self.collate(features)
        batch["index"] = torch.as_tensor(rows["index"], dtype=torch.int64)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        indices = range(self.start, len(self.batches))
        if self.prefetch <= 0:
            for i in indices:
                yield self.read(i)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                for i in indices:
                    if stop.is_set():
                        return
                    q.put(self.read(i))
                q.put(done)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
                q.put(exc)

        thread = threading.Thread(target=work, name="fastsel-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # Stop the reader thread and wait for it (it stops before its next read; draining frees a blocked
            # put), so that no thread is left inside Arrow when an error or a signal ends the process.
            stop.set()
            for _ in range(1000):
                with contextlib.suppress(queue.Empty):
                    while True:
                        q.get_nowait()
                thread.join(timeout=0.01)
                if not thread.is_alive():
                    break
