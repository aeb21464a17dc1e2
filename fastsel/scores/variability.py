"""Hidden-state variability ratio (Xie et al. 2022, section 3.1) of every layer, in one streaming pass.

For layer l, h_n is the mean of the hidden states of example n over its pooled tokens (attended and
not special, from the tokenizer's special-tokens mask; or the first token with ``pooling="cls"``).
With C classes, class means mu_c and mu_bar = (1/C) sum_c mu_c::

    Sigma_w = (1/C) sum_c (1/n_c) sum_{n in c} (h_n - mu_c)(h_n - mu_c)^T
    Sigma_b = (1/C) sum_c (mu_c - mu_bar)(mu_c - mu_bar)^T
    nu_l    = (1/C) tr(Sigma_w Sigma_b^+),          l* = argmin_l nu_l   (lower is better)

The ``papyan`` variant (appendix A.1) uses Sigma_w = (1/N) sum_c sum_{n in c} (...)(...)^T and the
global mean (1/N) sum_n h_n in Sigma_b. Only per-class (count, mean, scatter) are kept per layer: a forward hook
pools each block's output as it is produced (``fastsel::class_stats_pool``, (B, D) per layer), and after the
forward one call of the fused op ``fastsel::class_stats_update`` merges every layer of the batch: the corpus'
hidden states are never stored. Sigma_b has rank <= C - 1 (both centres are
weighted averages of the class means); its
pseudo-inverse is taken exactly in that subspace through the C x C Gram matrix of the centred means.

Layer indexing: blocks 0..L-1 (LayerScores), plus the embedding output (the input of block 0),
reported under ``extra["embeddings"]``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastsel import ops
from fastsel.capture.taps import POOLINGS, layer_taps, pool_mask
from fastsel.hf.io import eval_mode, model_inputs
from fastsel.hf.layer_map import LayerMap, map_layers
from fastsel.scores.confidence import batch_groups
from fastsel.scores.layer_scores import LayerScore, LayerScores
from fastsel.utils.groups import Rows, group_rows, num_rows, take_rows
from fastsel.utils.progress import progress_bar

__all__ = [
    "VARIANTS",
    "ClassStatistics",
    "merge_class_stats",
    "scatter_matrices",
    "variability_ratio",
    "smoothness",
    "ClassStatisticsAccumulation",
    "accumulate_class_statistics",
    "variability_from_statistics",
    "variability_layer_scores",
    "VariabilityResult",
]

VARIANTS = ("xie", "papyan")


class ClassStatistics:
    """Running per-class count (C,), mean (C, D) and scatter (C, D, D) of pooled states, per layer index.

    Allocated lazily per layer from the first states seen (layers may differ in width); :meth:`update_layers`
    keeps every layer's statistics in one stacked tensor each ((L, C), (L, C, D), (L, C, D, D); the lists hold
    views of them) so that one op call updates them all. ``state_dict`` / ``load_state_dict`` make it
    checkpointable (tensors moved to CPU).
    """

    def __init__(self, num_layers: int, num_classes: int, dtype: torch.dtype = torch.float64) -> None:
        if num_classes < 2:
            raise ValueError(f"fastsel: the variability ratio needs at least 2 classes, got {num_classes}")
        self.num_layers, self.num_classes, self.dtype = num_layers, num_classes, dtype
        self.count: list[Tensor | None] = [None] * num_layers
        self.mean: list[Tensor | None] = [None] * num_layers
        self.m2: list[Tensor | None] = [None] * num_layers
        # update_layers: every layer's statistics stacked, (L, C), (L, C, D), (L, C, D, D); the lists hold their views
        self._count_all: Tensor | None = None
        self._mean_all: Tensor | None = None
        self._m2_all: Tensor | None = None
        self.num_examples = 0  # examples fed (including skipped ones)
        self._skipped_host = 0  # examples without any pooled token: read so far ...
        self._skipped_device: Tensor | None = None  # ... and counted on the device since (no host sync per batch)

    @property
    def num_skipped(self) -> int:
        """Examples without any pooled token (reading it syncs with the device once for the batches since the last read)."""
        if self._skipped_device is not None:
            self._skipped_host += int(self._skipped_device)
            self._skipped_device = None
        return self._skipped_host

    @num_skipped.setter
    def num_skipped(self, value: int) -> None:
        self._skipped_host, self._skipped_device = int(value), None

    def count_skipped(self, mask: Tensor) -> None:
        """Add the examples of mask (B, T) without a pooled token, counted on the mask's device (no host sync)."""
        n = (mask.sum(1) == 0).sum()
        self._skipped_device = n if self._skipped_device is None else self._skipped_device + n

    def update(self, index: int, hidden: Tensor, mask: Tensor, labels: Tensor,
               grouping: ops.ClassGrouping | None = None) -> None:
        """Merge the pooled states of one batch of layer ``index``: hidden (B, T, D), mask (B, T), labels (B,);
        grouping: ``ops.class_grouping(labels, num_classes)``, made once per batch for all its layers (optional)."""
        if self.count[index] is None:
            C, D, dev = self.num_classes, hidden.shape[-1], hidden.device
            self.count[index] = torch.zeros(C, dtype=torch.float64, device=dev)
            self.mean[index] = torch.zeros(C, D, dtype=self.dtype, device=dev)
            self.m2[index] = torch.zeros(C, D, D, dtype=self.dtype, device=dev)
        ops.class_stats_update(self.count[index], self.mean[index], self.m2[index], hidden.detach(), mask, labels,
                               grouping)

    def update_layers(self, pooled: Tensor, present: Tensor, labels: Tensor,
                      grouping: ops.ClassGrouping | None = None) -> None:
        """Merge one batch of every layer at once: pooled (L, B, D) the examples' pooled states of each layer index
        (:func:`ops.class_stats_pool`), present (B,) bool whether an example has a pooled token (the others are
        skipped), labels (B,). One op call when every layer's statistics are stacked (or none exists yet), else one
        per layer."""
        L, B, D = pooled.shape
        if L != self.num_layers:
            raise ValueError(f"fastsel: update_layers needs all {self.num_layers} layer indices, got {L}")
        mask = present.reshape(B, 1)
        if self._stacked(D, pooled.device):
            ops.class_stats_update(self._count_all, self._mean_all, self._m2_all, pooled.unsqueeze(2), mask, labels,
                                   grouping)
        else:  # layers of other widths, or statistics kept apart: layer by layer
            for index in range(L):
                self.update(index, pooled[index].unsqueeze(1), mask, labels, grouping)

    def _stacked(self, D: int, device: torch.device) -> bool:
        """Whether every layer's statistics are (now) views of stacked tensors of width D on ``device``: allocated so
        if none exists yet, stacked once if all exist apart with that width (after load_state_dict)."""
        if self._count_all is not None and all(
                t is not None and t.data_ptr() == whole[i].data_ptr()
                for ts, whole in ((self.count, self._count_all), (self.mean, self._mean_all), (self.m2, self._m2_all))
                for i, t in enumerate(ts)):  # the lists still hold the views (nothing replaced a layer's tensors)
            return self._mean_all.shape[-1] == D and self._count_all.device == device  # type: ignore[union-attr]
        C = self.num_classes
        if all(c is None for c in self.count):
            L = self.num_layers
            self._count_all = torch.zeros(L, C, dtype=torch.float64, device=device)
            self._mean_all = torch.zeros(L, C, D, dtype=self.dtype, device=device)
            self._m2_all = torch.zeros(L, C, D, D, dtype=self.dtype, device=device)
        elif all(m is not None and m.shape == (C, D) and m.device == device for m in self.mean):
            self._count_all = torch.stack(self.count)  # type: ignore[arg-type]
            self._mean_all = torch.stack(self.mean)  # type: ignore[arg-type]
            self._m2_all = torch.stack(self.m2)  # type: ignore[arg-type]
        else:
            return False
        self.count, self.mean, self.m2 = list(self._count_all), list(self._mean_all), list(self._m2_all)
        return True

    def zero_(self) -> None:
        """Every count, mean and scatter to zero, in place (an empty class merges as no data)."""
        for t in (*self.count, *self.mean, *self.m2):
            if t is not None:
                t.zero_()

    def layer(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        if self.count[index] is None:
            raise ValueError(f"fastsel: no statistics for layer index {index} (no data seen)")
        return self.count[index], self.mean[index], self.m2[index]  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        cpu = lambda ts: [None if t is None else t.detach().cpu().clone() for t in ts]  # noqa: E731
        return {"num_layers": self.num_layers, "num_classes": self.num_classes, "dtype": str(self.dtype).split(".")[-1],
                "count": cpu(self.count), "mean": cpu(self.mean), "m2": cpu(self.m2),
                "num_examples": self.num_examples, "num_skipped": self.num_skipped}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
        if state["num_layers"] != self.num_layers or state["num_classes"] != self.num_classes:
            raise ValueError(
                f"fastsel: checkpoint has {state['num_layers']} layers x {state['num_classes']} classes, "
                f"expected {self.num_layers} x {self.num_classes}"
            )
        dev = lambda ts: [None if t is None else t.to(device) for t in ts]  # noqa: E731
        self.count, self.mean, self.m2 = dev(state["count"]), dev(state["mean"]), dev(state["m2"])
        self.dtype = getattr(torch, state["dtype"])
        self.num_examples, self.num_skipped = int(state["num_examples"]), int(state["num_skipped"])


def _check_classes(count: Tensor) -> None:
    counts = [int(c) for c in count.tolist()]
    if len(counts) < 2:
        raise ValueError("fastsel: the variability ratio needs at least 2 classes (a single class has no between-class variability)")
    bad = [c for c, n in enumerate(counts) if n < 2]
    if bad:
        raise ValueError(
            f"fastsel: the variability ratio needs at least 2 examples in every class; class counts are {counts} "
            f"(class(es) {bad} too small: use more examples, --balanced, or drop those classes)"
        )


def scatter_matrices(count: Tensor, mean: Tensor, m2: Tensor, variant: str = "xie") -> tuple[Tensor, Tensor]:
    """(Sigma_w (D, D), M (C, D)) with Sigma_b = M^T M / C, in float64.

    ``xie``: Sigma_w = (1/C) sum_c m2_c / n_c, M = mu_c - (1/C) sum_c mu_c.
    ``papyan``: Sigma_w = (1/N) sum_c m2_c, M = mu_c - (1/N) sum_n h_n.
    """
    if variant not in VARIANTS:
        raise ValueError(f"fastsel: unknown variant {variant!r}; choose from {VARIANTS}")
    _check_classes(count)
    count, mean, m2 = count.double(), mean.double(), m2.double()
    C = count.shape[0]
    if variant == "xie":
        sigma_w = (m2 / count.view(-1, 1, 1)).sum(0) / C
        centre = mean.mean(0)
    else:
        N = count.sum()
        sigma_w = m2.sum(0) / N
        centre = (count.unsqueeze(1) * mean).sum(0) / N
    return sigma_w, mean - centre


def variability_ratio(count: Tensor, mean: Tensor, m2: Tensor, variant: str = "xie") -> dict[str, float]:
    """nu = (1/C) tr(Sigma_w Sigma_b^+) from per-class statistics: count (C,), mean (C, D), m2 (C, D, D).

    Sigma_b = M^T M / C (D x D, rank k <= C - 1) is never formed: the thin SVD M = U diag(s) V^T (C x D, cost
    O(C^2 D)) gives its eigenpairs (v_i, s_i^2 / C), so tr(Sigma_w Sigma_b^+) = sum_i C v_i^T Sigma_w v_i / s_i^2
    over the top C - 1 singular values that exceed max(C, D) eps ||means||. O(D^2 C). Returns nu,
    the rank of Sigma_b, tr(Sigma_w) and tr(Sigma_b).
    """
    sigma_w, M = scatter_matrices(count, mean, m2, variant)
    C, D = M.shape
    _, sing, Vh = torch.linalg.svd(M, full_matrices=False)
    # Rank <= C - 1 exactly (the centre is an average of the class means): the C-th singular value is
    # rounding noise of the centring, ~eps * |mu|, never a direction to invert. Further degeneracy is
    # judged against the scale of the means themselves, since that is what the rounding error scales with.
    scale = max(float(sing.max()), float(torch.linalg.matrix_norm(mean.double(), ord=2)))
    keep = (sing > scale * max(C, D) * torch.finfo(torch.float64).eps) & (torch.arange(sing.shape[0]) < C - 1)
    if not bool(keep.any()) or float(sing.max()) == 0.0:
        raise ValueError("fastsel: all class means coincide (Sigma_b = 0); the variability ratio is undefined")
    lam_k = sing[keep].square() / C  # nonzero eigenvalues of Sigma_b
    V = Vh[keep].t()  # (D, k), orthonormal eigenvectors of Sigma_b
    quad = ((sigma_w @ V) * V).sum(0)  # v_i^T Sigma_w v_i
    nu = float((quad / lam_k).sum()) / C
    lam = sing.square() / C
    return {"nu": nu, "rank_sigma_b": int(keep.sum()), "trace_sigma_w": float(sigma_w.trace()), "trace_sigma_b": float(lam.clamp(min=0).sum())}


def smoothness(nu: Sequence[float]) -> float:
    """Local smoothness zeta of a nu curve (section 4.4): sum_l (nu_{l+2} - 2 nu_{l+1} + nu_l)^2 after
    z-scoring nu over the layers (footnote 2; population standard deviation). 0 for fewer than 3 layers
    or a constant curve."""
    v = np.asarray(nu, dtype=np.float64)
    if v.size < 3:
        return 0.0
    sd = v.std()
    if sd == 0:
        return 0.0
    z = (v - v.mean()) / sd
    return float(np.sum((z[2:] - 2 * z[1:-1] + z[:-2]) ** 2))


def check_labels(batch: Mapping[str, Tensor]) -> None:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("fastsel: the variability ratio needs labels")
    if labels.is_floating_point():
        raise ValueError("fastsel: the variability ratio needs class labels, got real-valued (regression) labels")


class ClassStatisticsAccumulation:
    """Per-class statistics of every layer's pooled states over one pass, fed batch by batch: the one driver of
    the variability metric, run by :func:`accumulate_class_statistics` here and by the streamed pass
    (:mod:`fastsel.pipeline.drivers.variability`).

    ``capture(batch)`` taps every layer while the model's forward of the batch runs (no hidden state is kept);
    ``consume(batch)`` after it counts the examples. batch: input_ids, attention_mask (B, T),
    special_tokens_mask (B, T) for mean pooling, optional token_type_ids, integer labels (B,) in
    [0, num_classes), optional index (B,) int64 global example positions (needed with ``groups``), optional
    group (B,) int64 (each example's group; default index mod K). With ``groups`` K > 0 the examples of each
    group also go to their own statistics.
    ``on_layer(index, hidden, mask, labels)``, if given, sees every layer's states too.
    """

    def __init__(self, model: nn.Module, layer_map: LayerMap, num_classes: int, *, pooling: str = "mean", groups: int = 0,
                 dtype: torch.dtype = torch.float64,
                 on_layer: Callable[[int, Tensor, Tensor, Tensor], None] | None = None) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"fastsel: unknown pooling {pooling!r}; choose from {POOLINGS}")
        self.model, self.layer_map, self.pooling, self.groups, self.on_layer = model, layer_map, pooling, groups, on_layer
        self.stats = ClassStatistics(layer_map.num_layers + 1, num_classes, dtype)
        self.group_stats = [ClassStatistics(layer_map.num_layers + 1, num_classes, dtype) for _ in range(groups)]
        self._mask: Tensor | None = None
        self._labels: Tensor | None = None
        self._grouping: ops.ClassGrouping | None = None
        self._rows: list[tuple[int, Rows]] = []
        self._group_groupings: list[ops.ClassGrouping] = []
        self._pooled: Tensor | None = None  # (L, B, D): the batch's pooled states of every layer index
        self._seen: list[bool] = []  # which layer indices the forward has pooled into it
        self._hooked = False  # hooked(): the layer taps stay registered across batches

    def _tap(self, index: int, hidden: Tensor) -> None:
        """Layer ``index``'s states (B, T, D) as the forward makes them: pooled into row ``index`` of the batch's
        (L, B, D) buffer (one launch); merged with the other layers' after the forward (:meth:`_merge`)."""
        mask, labels = self._mask, self._labels
        if mask is None:  # a forward outside capture() while hooked: not a batch of the pass
            return
        B, D = hidden.shape[0], hidden.shape[-1]
        pooled = self._pooled
        if pooled is None:
            pooled = self._pooled = torch.empty(self.stats.num_layers, B, D, dtype=self.stats.dtype, device=hidden.device)
        if self._seen[index] or pooled.shape[-1] != D:  # a layer tapped twice, or of another width: merged now
            self._update_now(index, hidden)
        else:
            ops.class_stats_pool(pooled[index], hidden.detach(), mask)
            self._seen[index] = True
        if self.on_layer is not None:
            self.on_layer(index, hidden, mask, labels)  # type: ignore[arg-type]

    def _update_now(self, index: int, hidden: Tensor) -> None:
        mask, labels = self._mask, self._labels
        self.stats.update(index, hidden, mask, labels, self._grouping)  # type: ignore[arg-type]
        for (k, rows), grouping in zip(self._rows, self._group_groupings):
            self.group_stats[k].update(index, take_rows(hidden, rows), take_rows(mask, rows),  # type: ignore[arg-type]
                                       take_rows(labels, rows), grouping)  # type: ignore[arg-type]

    def _merge(self) -> None:
        """After the forward: every pooled layer of the batch into the statistics, one op call for all of them (and
        one per confidence group), or layer by layer when some layer was not tapped."""
        pooled, labels = self._pooled, self._labels
        if pooled is None or not any(self._seen):
            return
        present = (self._mask != 0).any(1)  # type: ignore[union-attr]
        by_example = pooled.transpose(0, 1)  # (B, L, D): the examples' rows, for the groups
        targets = [(self.stats, None, self._grouping)]
        targets += [(self.group_stats[k], rows, grouping) for (k, rows), grouping in zip(self._rows, self._group_groupings)]
        for stats, rows, grouping in targets:
            p = take_rows(by_example, rows).transpose(0, 1)
            y, keep = take_rows(labels, rows), take_rows(present, rows)  # type: ignore[arg-type]
            if all(self._seen):
                stats.update_layers(p, keep, y, grouping)
            else:
                for index in (i for i, seen in enumerate(self._seen) if seen):
                    stats.update(index, p[index].unsqueeze(1), keep.unsqueeze(1), y, grouping)

    @contextlib.contextmanager
    def capture(self, batch: Mapping[str, Tensor]) -> Iterator["ClassStatisticsAccumulation"]:
        check_labels(batch)
        self._mask, self._labels = pool_mask(batch, self.pooling), batch["labels"].long()
        # The examples grouped by class once per batch on the device, for every layer's update (no host sync).
        C = self.stats.num_classes
        self._grouping = ops.class_grouping(self._labels, C)
        self._rows, self._group_groupings = [], []
        if self.groups:  # slices of a batch sorted by group; no device sync for an index kept on the CPU
            self._rows = group_rows(batch_groups(batch, self.groups), self.groups, batch["input_ids"].device)
            self._group_groupings = [ops.class_grouping(take_rows(self._labels, rows), C) for _, rows in self._rows]
        self._pooled, self._seen = None, [False] * self.stats.num_layers
        try:
            with contextlib.nullcontext() if self._hooked else layer_taps(self.model, self.layer_map, self._tap):
                yield self
            self._merge()  # only after a whole forward: a failed batch adds nothing
        finally:
            self._mask = self._labels = self._grouping = self._pooled = None
            self._group_groupings = []

    @contextlib.contextmanager
    def hooked(self) -> Iterator["ClassStatisticsAccumulation"]:
        """Keep the layer taps registered across the batches inside (one registration for a whole pass, not one per
        :meth:`capture`); they do nothing outside a capture. Nested: the outer one holds them."""
        if self._hooked:
            yield self
            return
        with layer_taps(self.model, self.layer_map, self._tap):
            self._hooked = True
            try:
                yield self
            finally:
                self._hooked = False

    def consume(self, batch: Mapping[str, Tensor], outputs: Any = None) -> None:
        self.stats.num_examples += int(batch["input_ids"].shape[0])
        self.stats.count_skipped(self._mask)  # type: ignore[arg-type]
        for k, rows in self._rows:
            self.group_stats[k].num_examples += num_rows(rows)


def accumulate_class_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    num_classes: int,
    pooling: str = "mean",
    layer_map: LayerMap | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    total: int | None = None,
    progress: bool = False,
    on_layer: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
) -> ClassStatistics:
    """One forward per batch; every layer's pooled states are merged into ClassStatistics as produced.

    batches: dicts with input_ids, attention_mask (B, T), special_tokens_mask (B, T) for mean pooling,
    optional token_type_ids, and integer labels (B,) in [0, num_classes). In memory; the streamed pass
    (checkpoints, several processes, one pass with Fisher) runs the same ClassStatisticsAccumulation.
    ``on_layer(index, hidden, mask, labels)``, if given, also sees every layer's states (e.g. to keep the
    pooled states of a small probe set from the same forward).
    """
    acc = ClassStatisticsAccumulation(model, layer_map or map_layers(model), num_classes, pooling=pooling, dtype=dtype,
                                      on_layer=on_layer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model), torch.no_grad(), acc.hooked(), \
            progress_bar(total=total, desc=f"variability ({pooling})", unit="ex", disable=not progress) as bar:
        for batch in batches:
            check_labels(batch)
            batch = {k: v.to(device) for k, v in batch.items()}
            B = int(batch["input_ids"].shape[0])
            if B == 0:
                continue
            with acc.capture(batch):
                model(**model_inputs(batch))
                acc.consume(batch)
            bar.update(B)
    if acc.stats.num_examples == 0:
        raise ValueError("fastsel: no examples to compute the variability ratio on (empty data)")
    return acc.stats


@dataclass
class VariabilityResult:
    """nu per layer index (0 = embeddings, l + 1 = block l) for each variant, and the class counts."""

    nu: dict[str, list[float]]
    details: dict[str, list[dict[str, float]]]
    class_counts: list[int]
    num_examples: int
    num_skipped: int


def _layer_ratio(stats: ClassStatistics, index: int, variant: str) -> dict[str, Any]:
    """nu of one layer index; the embedding output (index 0, not ranked) may legitimately have no class
    signal (CLS pooling: the first token's embedding is the same for every example), so there a
    degenerate Sigma_b gives nu = None with the reason instead of failing the run."""
    try:
        return variability_ratio(*stats.layer(index), variant=variant)
    except ValueError as exc:
        if index != 0 or "coincide" not in str(exc):
            raise
        return {"nu": None, "rank_sigma_b": 0, "trace_sigma_w": None, "trace_sigma_b": 0.0, "note": str(exc)}


def variability_from_statistics(stats: ClassStatistics, variants: Sequence[str] = VARIANTS) -> VariabilityResult:
    nu: dict[str, list[float]] = {}
    details: dict[str, list[dict[str, float]]] = {}
    for variant in variants:
        rows = [_layer_ratio(stats, i, variant) for i in range(stats.num_layers)]
        details[variant] = rows
        nu[variant] = [r["nu"] for r in rows]
    counts = [int(c) for c in stats.layer(0)[0].tolist()]
    return VariabilityResult(nu, details, counts, stats.num_examples, stats.num_skipped)


def _embedding_extra(res: VariabilityResult, variant: str) -> dict[str, Any]:
    d = res.details[variant][0]
    if d["nu"] is None:  # no class signal in the embedding output: no "score" (tables skip it), say why
        return {"nu_xie": res.nu["xie"][0], "nu_papyan": res.nu["papyan"][0], "note": d["note"]}
    return {"score": d["nu"], "nu_xie": res.nu["xie"][0], "nu_papyan": res.nu["papyan"][0]}


def variability_layer_scores(
    stats: ClassStatistics,
    layer_map: LayerMap,
    *,
    variant: str = "xie",
    pooling: str = "mean",
    model_name: str = "",
    task: str = "",
    split: str = "",
) -> "LayerScores":
    """LayerScores of blocks 0..L-1 by nu (lower is better), ``l_star`` and zeta in info, the embedding
    output's nu in extra["embeddings"], and both variants' nu in each layer's values."""

    res = variability_from_statistics(stats)
    nu = res.nu[variant]
    blocks = nu[1:]
    layers = []
    for l, v in enumerate(blocks):
        d = res.details[variant][l + 1]
        values = {"nu_xie": res.nu["xie"][l + 1], "nu_papyan": res.nu["papyan"][l + 1],
                  "trace_sigma_w": d["trace_sigma_w"], "trace_sigma_b": d["trace_sigma_b"], "rank_sigma_b": d["rank_sigma_b"]}
        layers.append(LayerScore(l, layer_map.block_name(l), v, values=values))
    l_star = int(np.argmin(blocks))
    return LayerScores(
        metric="variability",
        model=model_name,
        task=task,
        split=split,
        num_examples=res.num_examples,
        mode=f"{variant}/{pooling}",
        higher_is_better=False,
        layers=layers,
        extra={"embeddings": _embedding_extra(res, variant)},
        info={"l_star": l_star, "zeta": smoothness(blocks), "zeta_papyan": smoothness(res.nu["papyan"][1:]),
              "pooling": pooling, "variant": variant, "class_counts": res.class_counts,
              "skipped_examples": res.num_skipped},
    )


def merge_class_stats(
    count_a: Tensor, mean_a: Tensor, m2_a: Tensor, count_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact merge of two sets of per-class statistics (Chan, Golub & LeVeque 1979).

    count (C,) examples per class, mean (C, D), m2 (C, D, D) = sum_i (x_i - mean)(x_i - mean)^T per class.
    Returns the statistics of the union: n = na + nb, delta = mb - ma,
    mean = ma + delta nb / n, M2 = M2a + M2b + delta delta^T na nb / n. Classes empty on both sides stay
    zero. Computed in the inputs' dtype (use float64 accumulators for long corpora).
    """
    if count_a.shape != count_b.shape or mean_a.shape != mean_b.shape or m2_a.shape != m2_b.shape:
        raise ValueError(f"fastsel: class statistics of different shapes: {tuple(mean_a.shape)} vs {tuple(mean_b.shape)}")
    if mean_a.dim() != 2 or m2_a.shape != (*mean_a.shape, mean_a.shape[1]) or count_a.shape != mean_a.shape[:1]:
        raise ValueError(f"fastsel: expected count (C,), mean (C, D), m2 (C, D, D); got {tuple(count_a.shape)}, "
                         f"{tuple(mean_a.shape)}, {tuple(m2_a.shape)}")
    na = count_a.to(mean_a.dtype)
    nb = count_b.to(mean_a.dtype)
    n = na + nb
    safe = torch.where(n > 0, n, torch.ones_like(n))
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / safe)[:, None]
    m2 = m2_a + m2_b + delta[:, :, None] * delta[:, None, :] * (na * nb / safe)[:, None, None]
    return count_a + count_b, mean, m2
