"""Hidden-state variability ratio (Xie et al. 2022, section 3.1) of every layer, in one streaming pass.

For layer l, h_n is the mean of the hidden states of example n over its pooled tokens (attended and
not special, from the tokenizer's special-tokens mask; or the first token with ``pooling="cls"``).
With C classes, class means mu_c and mu_bar = (1/C) sum_c mu_c::

    Sigma_w = (1/C) sum_c (1/n_c) sum_{n in c} (h_n - mu_c)(h_n - mu_c)^T
    Sigma_b = (1/C) sum_c (mu_c - mu_bar)(mu_c - mu_bar)^T
    nu_l    = (1/C) tr(Sigma_w Sigma_b^+),          l* = argmin_l nu_l   (lower is better)

The ``papyan`` variant (appendix A.1) uses Sigma_w = (1/N) sum_c sum_{n in c} (...)(...)^T and the
global mean (1/N) sum_n h_n in Sigma_b. Only per-class (count, mean, scatter) are kept per layer,
updated by the fused op ``fastsel::class_stats_update`` from forward hooks as each block's output is
produced: the corpus' hidden states are never stored. Sigma_b has rank <= C - 1 (both centres are
weighted averages of the class means); its
pseudo-inverse is taken exactly in that subspace through the C x C Gram matrix of the centred means.

Layer indexing: blocks 0..L-1 (LayerScores), plus the embedding output (the input of block 0),
reported under ``extra["embeddings"]``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastsel import ops
from fastsel.layers import LayerMap, map_layers
from fastsel.progress import progress_bar

if TYPE_CHECKING:
    from fastsel.scores import LayerScores

__all__ = [
    "POOLINGS",
    "VARIANTS",
    "pool_mask",
    "layer_taps",
    "ClassStatistics",
    "scatter_matrices",
    "variability_ratio",
    "smoothness",
    "accumulate_class_statistics",
    "variability_layer_scores",
    "VariabilityResult",
    "PooledStates",
]

POOLINGS = ("mean", "cls")
VARIANTS = ("xie", "papyan")


# --------------------------------------------------------------------------------------------------
# Pooling masks and hooks
# --------------------------------------------------------------------------------------------------


def pool_mask(batch: Mapping[str, Tensor], pooling: str = "mean") -> Tensor:
    """(B, T) bool mask of the tokens whose states are averaged into each example's state.

    ``mean``: attended and not special (needs ``special_tokens_mask`` from the tokenizer, as given by
    fastsel.data; never guessed from token ids). ``cls``: the first attended token (CLS / <s>), on either
    padding side.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"fastsel: unknown pooling {pooling!r}; choose from {POOLINGS}")
    attention = batch["attention_mask"].bool()
    if pooling == "mean":
        if "special_tokens_mask" not in batch:
            raise ValueError("fastsel: mean pooling needs the batch's special_tokens_mask (tokenize with fastsel.data)")
        return attention & ~batch["special_tokens_mask"].bool()
    first = attention.long().argmax(1)  # first attended position
    mask = torch.zeros_like(attention)
    mask[torch.arange(mask.shape[0], device=mask.device), first] = True
    return mask & attention


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in ("hidden_states", "hidden_state", "x"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    raise RuntimeError("fastsel: could not find the hidden states entering block 0")


@contextlib.contextmanager
def layer_taps(model: nn.Module, layer_map: LayerMap, consume: Callable[[int, Tensor], None]) -> Iterator[None]:
    """Call ``consume(index, hidden (B, T, D))`` as each layer's states are produced during a forward.

    index 0 is the embedding output (the input of block 0, i.e. ``hidden_states[0]`` of HF models),
    index l + 1 the output of block l, as HF's ``hidden_states[l + 1]``: for the last block of a pre-LN
    backbone with a final norm (Llama, Qwen2, ModernBERT) that is the norm's output. Hooks are removed on exit.
    """
    blocks = layer_map.blocks(model)
    handles = [
        blocks[0].register_forward_pre_hook(lambda _m, args, kwargs: consume(0, _first_tensor(args, kwargs)), with_kwargs=True)
    ]
    outputs = list(blocks)
    if layer_map.final_norm_name:
        outputs[-1] = model.get_submodule(layer_map.final_norm_name)
    for l, module in enumerate(outputs):
        def hook(_m, _args, out, l=l):
            consume(l + 1, out[0] if isinstance(out, (tuple, list)) else out)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# --------------------------------------------------------------------------------------------------
# The statistics
# --------------------------------------------------------------------------------------------------


class ClassStatistics:
    """Running per-class count (C,), mean (C, D) and scatter (C, D, D) of pooled states, per layer index.

    Allocated lazily per layer from the first states seen (layers may differ in width). ``state_dict``
    / ``load_state_dict`` make it checkpointable (tensors moved to CPU).
    """

    def __init__(self, num_layers: int, num_classes: int, dtype: torch.dtype = torch.float64) -> None:
        if num_classes < 2:
            raise ValueError(f"fastsel: the variability ratio needs at least 2 classes, got {num_classes}")
        self.num_layers, self.num_classes, self.dtype = num_layers, num_classes, dtype
        self.count: list[Tensor | None] = [None] * num_layers
        self.mean: list[Tensor | None] = [None] * num_layers
        self.m2: list[Tensor | None] = [None] * num_layers
        self.num_examples = 0  # examples fed (including skipped ones)
        self.num_skipped = 0  # examples without any pooled token

    def update(self, index: int, hidden: Tensor, mask: Tensor, labels: Tensor) -> None:
        """Merge the pooled states of one batch of layer ``index``: hidden (B, T, D), mask (B, T), labels (B,)."""
        if self.count[index] is None:
            C, D, dev = self.num_classes, hidden.shape[-1], hidden.device
            self.count[index] = torch.zeros(C, dtype=torch.float64, device=dev)
            self.mean[index] = torch.zeros(C, D, dtype=self.dtype, device=dev)
            self.m2[index] = torch.zeros(C, D, D, dtype=self.dtype, device=dev)
        ops.class_stats_update(self.count[index], self.mean[index], self.m2[index], hidden.detach(), mask, labels)

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


# --------------------------------------------------------------------------------------------------
# The streaming pass
# --------------------------------------------------------------------------------------------------


def _check_labels(batch: Mapping[str, Tensor]) -> None:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("fastsel: the variability ratio needs labels")
    if labels.is_floating_point():
        raise ValueError("fastsel: the variability ratio needs class labels, got real-valued (regression) labels")


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
    optional token_type_ids, and integer labels (B,) in [0, num_classes). In-memory API; for corpora that
    need checkpoints, several processes or one pass with Fisher, the CLI runs
    :class:`VariabilityConsumer` inside :func:`fastsel.pipeline.run_pass`.
    ``on_layer(index, hidden, mask, labels)``, if given, also sees every layer's states (e.g. to keep the
    pooled states of a small probe set from the same forward).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"fastsel: unknown pooling {pooling!r}; choose from {POOLINGS}")
    layer_map = layer_map or map_layers(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stats = ClassStatistics(layer_map.num_layers + 1, num_classes, dtype)
    was_training = model.training
    model.eval()
    current: dict[str, Tensor] = {}

    def consume(index: int, hidden: Tensor) -> None:
        stats.update(index, hidden, current["mask"], current["labels"])
        if on_layer is not None:
            on_layer(index, hidden, current["mask"], current["labels"])

    try:
        with progress_bar(total=total, desc=f"variability ({pooling})", unit="ex", disable=not progress) as bar, \
                layer_taps(model, layer_map, consume), torch.no_grad():
            for batch in batches:
                _check_labels(batch)
                batch = {k: v.to(device) for k, v in batch.items()}
                B = int(batch["input_ids"].shape[0])
                if B == 0:
                    continue
                current["mask"] = pool_mask(batch, pooling)
                current["labels"] = batch["labels"].long()
                model(**model_inputs(batch))
                stats.num_examples += B
                stats.num_skipped += int((current["mask"].sum(1) == 0).sum())
                bar.update(B)
    finally:
        model.train(was_training)
    if stats.num_examples == 0:
        raise ValueError("fastsel: no examples to compute the variability ratio on (empty data)")
    return stats


class PooledStates:
    """``on_layer`` callback keeping every layer's pooled states (N, D) and the labels: for the small
    probe / CCA sets only, never for the streaming statistics. Examples without pooled tokens dropped."""

    def __init__(self) -> None:
        self.states: dict[int, list[np.ndarray]] = {}
        self.labels: list[np.ndarray] = []

    def __call__(self, index: int, hidden: Tensor, mask: Tensor, labels: Tensor | None) -> None:
        w = mask.to(torch.float64)
        keep = mask.any(1)
        pooled = torch.bmm(w.unsqueeze(1), hidden.detach().to(torch.float64)).squeeze(1) / w.sum(1, keepdim=True).clamp(min=1)
        self.states.setdefault(index, []).append(pooled[keep].cpu().numpy())
        if index == 0 and labels is not None:
            self.labels.append(labels[keep].cpu().numpy())

    def result(self) -> tuple[list[np.ndarray], np.ndarray]:
        if not self.states:
            raise ValueError("fastsel: no examples (empty data)")
        return [np.concatenate(self.states[i]) for i in sorted(self.states)], (np.concatenate(self.labels) if self.labels else np.zeros(0))


# --------------------------------------------------------------------------------------------------
# Layer scores
# --------------------------------------------------------------------------------------------------


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
    from fastsel.scores import LayerScore, LayerScores

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


# --------------------------------------------------------------------------------------------------
# The streamed pass (fastsel.pipeline): checkpoints, several processes, one pass with Fisher
# --------------------------------------------------------------------------------------------------


class VariabilityConsumer:
    """Class statistics inside :func:`fastsel.pipeline.run_pass`.

    ``capture`` taps every block while the shared forward runs (the same forward the Fisher backward
    uses with ``--metric fisher,variability``), so no hidden states are kept; the statistics are
    checkpointable (``state_dict``) and merged exactly over ranks (Chan's formula, in rank order).
    """

    name = "variability"
    needs_backward = False
    needs_hidden_states = False  # hooks on the blocks, not output_hidden_states

    def __init__(self, ctx: Any) -> None:
        opts = ctx.config.options
        self.ctx = ctx
        self.pooling = opts.get("pooling") or "mean"
        self.variant = opts.get("variant") or "xie"
        if self.pooling not in POOLINGS:
            raise ValueError(f"fastsel: unknown pooling {self.pooling!r}; choose from {POOLINGS}")
        if self.variant not in VARIANTS:
            raise ValueError(f"fastsel: unknown variant {self.variant!r}; choose from {VARIANTS}")
        self.stats = ClassStatistics(ctx.layer_map.num_layers + 1, ctx.task.num_labels)
        from fastsel.pipeline import confidence_groups

        # ranking confidence (fastsel.confidence): one set of class statistics per group of examples
        self.groups = confidence_groups(ctx.config)
        self.group_stats = [ClassStatistics(ctx.layer_map.num_layers + 1, ctx.task.num_labels) for _ in range(self.groups)]
        self._mask: Tensor | None = None
        self._labels: Tensor | None = None
        self._rows: list[tuple[int, Tensor]] = []

    def _tap(self, index: int, hidden: Tensor) -> None:
        self.stats.update(index, hidden, self._mask, self._labels)  # type: ignore[arg-type]
        for k, idx in self._rows:
            self.group_stats[k].update(index, hidden.index_select(0, idx), self._mask.index_select(0, idx),  # type: ignore[union-attr]
                                       self._labels.index_select(0, idx))  # type: ignore[union-attr]

    @contextlib.contextmanager
    def capture(self, batch: Mapping[str, Tensor]) -> Iterator["VariabilityConsumer"]:
        _check_labels(batch)
        self._mask, self._labels = pool_mask(batch, self.pooling), batch["labels"].long()
        self._rows = []
        if self.groups:
            from fastsel.confidence import group_ids

            gid = group_ids(batch["index"], self.groups)
            for k in range(self.groups):
                idx = (gid == k).nonzero().flatten()
                if idx.numel():
                    self._rows.append((k, idx))
        with layer_taps(self.ctx.model, self.ctx.layer_map, self._tap):
            yield self

    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None:
        self.stats.num_examples += int(batch["input_ids"].shape[0])
        self.stats.num_skipped += int((self._mask.sum(1) == 0).sum())  # type: ignore[union-attr]
        for k, idx in self._rows:
            self.group_stats[k].num_examples += int(idx.numel())

    def state_dict(self) -> dict[str, Any]:
        state = self.stats.state_dict()
        if self.groups:
            state["groups"] = [g.state_dict() for g in self.group_stats]
        return state

    def finite_flag(self) -> Tensor | None:
        """0-dim bool tensor: every class statistic is finite (checked by the pass, one sync per batch)."""
        st = self.stats
        # a sum is NaN/Inf when any element is (finite float64 statistics do not overflow): one cheap read
        totals = [t.sum() for ts in (st.mean, st.m2) for t in ts if t is not None]
        return torch.isfinite(torch.stack(totals)).all() if totals else None

    def first_nonfinite(self) -> str | None:
        st = self.stats
        for i in range(st.num_layers):
            for what, t in (("mean", st.mean[i]), ("scatter", st.m2[i])):
                if t is not None and not bool(torch.isfinite(t).all()):
                    return f"class {what} of {'the embeddings' if i == 0 else f'block {i - 1}'} (variability statistics)"
        return None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stats.load_state_dict(state, self.ctx.device)
        if self.groups:
            saved = state.get("groups")
            if saved is None or len(saved) != self.groups:
                raise ValueError("fastsel: the checkpoint has no (or other) per-group class statistics")
            for g, st in zip(self.group_stats, saved):
                g.load_state_dict(st, self.ctx.device)

    def all_reduce(self, group: Any = None) -> None:
        from fastsel.distributed import all_merge_class_stats, all_reduce_sum_

        for st in [self.stats, *self.group_stats]:
            self._fill_empty(st)
            for i in range(st.num_layers):
                st.count[i], st.mean[i], st.m2[i] = all_merge_class_stats(st.count[i], st.mean[i], st.m2[i], group)
            counters = torch.tensor([st.num_examples, st.num_skipped], dtype=torch.float64, device=self.ctx.device)
            all_reduce_sum_([counters], group)
            st.num_examples, st.num_skipped = (int(v) for v in counters.tolist())

    def _fill_empty(self, st: ClassStatistics) -> None:
        """Layers without data (a rank or group that saw none) get empty classes."""
        width = int(getattr(self.ctx.model.config, "hidden_size", 0) or getattr(self.ctx.model.config, "dim"))
        for i in range(st.num_layers):
            if st.count[i] is None:
                st.count[i] = torch.zeros(st.num_classes, dtype=torch.float64, device=self.ctx.device)
                st.mean[i] = torch.zeros(st.num_classes, width, dtype=st.dtype, device=self.ctx.device)
                st.m2[i] = torch.zeros(st.num_classes, width, width, dtype=st.dtype, device=self.ctx.device)

    def stability_scores(self, active: bool):
        """Mid-pass (--until-stable): scores_of(groups) on the groups so far, merged over the ranks (copies)."""
        from fastsel.distributed import all_merge_class_stats

        copies = []
        for g in self.group_stats:
            self._fill_empty(g)
            c = ClassStatistics(g.num_layers, g.num_classes, g.dtype)
            for i in range(g.num_layers):
                t = tuple(x.clone() for x in g.layer(i))
                c.count[i], c.mean[i], c.m2[i] = all_merge_class_stats(*t, None) if active else t
            copies.append(c)
        return lambda groups: self.group_scores(groups, copies)

    def group_scores(self, groups: list[int], group_stats: list[ClassStatistics] | None = None) -> list[float]:
        """nu of blocks 0..L-1 on the examples of ``groups`` alone (their class statistics merged exactly)."""
        from fastsel.pipeline import merge_class_stats

        group_stats = self.group_stats if group_stats is None else group_stats
        out = []
        for i in range(1, self.stats.num_layers):
            merged = None
            for g in groups:
                self._fill_empty(group_stats[g])
                part = group_stats[g].layer(i)
                merged = part if merged is None else merge_class_stats(*merged, *part)
            out.append(variability_ratio(*merged, variant=self.variant)["nu"])  # type: ignore[misc]
        return out

    def result(self) -> "LayerScores":
        if self.stats.num_examples == 0:
            raise ValueError("fastsel: no examples to compute the variability ratio on (empty data)")
        cfg = self.ctx.config
        scores = variability_layer_scores(self.stats, self.ctx.layer_map, variant=self.variant, pooling=self.pooling,
                                          model_name=cfg.model, task=self.ctx.task.name, split=cfg.split)
        if self.groups:
            from fastsel.confidence import confidence_from_groups

            scores.info["ranking_confidence"] = confidence_from_groups([l.score for l in scores.layers], self.group_scores,
                                                                       self.groups, False)
        return scores


# --------------------------------------------------------------------------------------------------
# The metric (fastsel score --metric variability)
# --------------------------------------------------------------------------------------------------


def _variability_run(ctx) -> "LayerScores":
    opts = ctx.config.options
    pooling = opts.get("pooling") or "mean"
    variant = opts.get("variant") or "xie"
    probe_states = PooledStates() if opts.get("probe") else None
    stats = accumulate_class_statistics(
        ctx.model,
        ctx.loader(),
        num_classes=ctx.task.num_labels,
        pooling=pooling,
        layer_map=ctx.layer_map,
        total=len(ctx.features),
        progress=ctx.progress,
        on_layer=probe_states,
    )
    scores = variability_layer_scores(stats, ctx.layer_map, variant=variant, pooling=pooling, model_name=ctx.config.model,
                                      task=ctx.task.name, split=ctx.config.split)
    if opts.get("probe"):
        from fastsel.probing import attach_probes

        attach_probes(ctx, scores, probe_states.result() if probe_states is not None else None)
    return scores


def _variability_args(p) -> None:
    p.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="sequence state: mean of the non-special tokens, or the first (CLS) token (variability, cca, numrank, probe)")
    p.add_argument("--variant", choices=VARIANTS, default="xie",
                   help="xie: class-balanced Sigma_w, Sigma_b (section 3.1); papyan: frequency-weighted, global mean (appendix A.1)")
    p.add_argument("--probe", action="store_true",
                   help="also train a probe per layer and report the probe score s and rho(nu, s) (see --metric probe options)")


def _register() -> None:
    from fastsel.pipeline import CONSUMERS, register_consumer
    from fastsel.plot import plot_layer_curves
    from fastsel.scoring import METRICS, Metric, register_metric

    if "variability" not in CONSUMERS:
        register_consumer("variability", VariabilityConsumer)
    if "variability" not in METRICS:
        register_metric(
            Metric(
                name="variability",
                run=_variability_run,
                higher_is_better=False,
                needs_labels=True,
                classification_only=True,
                add_arguments=_variability_args,
                help="hidden-state variability ratio nu per layer (Xie et al. 2022); l* = argmin",
                plot=plot_layer_curves,
            )
        )


_register()
