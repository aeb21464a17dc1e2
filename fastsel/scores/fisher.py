"""Fisher-information layer scores (Lodha et al. 2023, section 3.1, eq. 1), done right.

F_j = (1/N) sum_i (d log p_theta(y_i | x_i) / d theta_j)**2 over N examples, model in eval mode,
attention mask applied, gradients of the log-likelihood (not of raw logits), every example its own
gradient (not one example repeated). Modes choose y_i:

- ``empirical``: the gold label;
- ``sampled``:   y_i ~ p_theta(. | x_i), seeded;
- ``exact``:     the expectation over all classes, weighted by p_theta(c | x_i).

Regression heads (one output) use a unit-variance Gaussian likelihood. The layer score of block l is the
Frobenius norm of its diagonal, sqrt(sum_{j in l} F_j**2); the trace sum_j F_j and the parameter count
are reported too. Embeddings, pooler and head are reported separately, not ranked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fastsel.capture.per_example import SquaredGradAccumulator
from fastsel.hf.io import eval_mode, logits_of, model_inputs
from fastsel.hf.layer_map import EMBEDDINGS, HEAD, POOLER, LayerMap, map_layers
from fastsel.scores.confidence import batch_groups, kendall_tau_b
from fastsel.scores.layer_scores import LayerScore, LayerScores
from fastsel.utils.progress import progress_bar

__all__ = [
    "FISHER_MODES",
    "GroupGrams",
    "AGGREGATES",
    "block_aggregates",
    "aggregation_summary",
    "FisherAccumulation",
    "LIKELIHOODS",
    "Likelihood",
    "FisherResult",
    "fisher_diagonal",
    "fisher_layer_scores",
    "layer_statistics",
    "example_uniforms",
    "fisher_terms",
    "fisher_terms_from_logits",
    "fisher_scores",
    "group_statistics",
    "float64_chunk",
]

FISHER_MODES = ("empirical", "sampled", "exact")


# --------------------------------------------------------------------------------------------------
# Likelihoods: per-example terms whose squared gradients, summed, give each example's Fisher term.
# --------------------------------------------------------------------------------------------------


def example_uniforms(seed: int, first_index: int, count: int, indices: Tensor | None = None) -> Tensor:
    """(count, 2) float64 uniforms in (0, 1) for examples first_index.. of the data, keyed by (seed, index).

    ``indices`` (count,) integer, when given, are the examples' global positions instead of
    first_index..first_index+count-1 (batches of length-bucketed or sharded data are not contiguous).
    Counter-based (splitmix64), so an example's draw does not depend on how the data is batched.
    """
    mask = (1 << 64) - 1
    positions = range(first_index, first_index + count) if indices is None else [int(i) for i in indices.reshape(-1).tolist()]
    if len(positions) != count:
        raise ValueError(f"fastsel: {len(positions)} example indices for {count} examples")
    out = []
    for i in positions:
        row = []
        for stream in (0, 1):
            z = (seed * 0x9E3779B97F4A7C15 + (2 * i + stream + 1) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            z ^= z >> 31
            row.append(((z >> 11) + 0.5) / float(1 << 53))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(count, 2)


@dataclass(frozen=True)
class Likelihood:
    """terms(outputs (B, C), labels (B,), mode, noise (B, 2) uniforms) -> list of (B,) tensors.

    For ``exact`` the expectation over y is written as several terms whose squared gradients add up to it:
    sum_terms (d term_b)**2 = E_y (d log p(y | x_b))**2 for every example b (C - 1 terms for C classes).
    """

    name: str
    terms: Callable[[Tensor, Tensor | None, str, Tensor], list[Tensor]]


def _categorical_terms(logits: Tensor, labels: Tensor | None, mode: str, noise: Tensor) -> list[Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    if mode == "empirical":
        if labels is None:
            raise ValueError("fastsel: the empirical Fisher needs gold labels; use --fisher sampled or exact")
        return [logp.gather(1, labels.long().view(-1, 1)).squeeze(1)]
    if mode == "sampled":
        cdf = logp.detach().double().exp().cumsum(1).cpu()
        u = noise[:, :1] * cdf[:, -1:]
        y = torch.searchsorted(cdf, u).clamp_(max=logp.shape[1] - 1).to(logits.device)
        return [logp.gather(1, y).squeeze(1)]
    if mode == "exact":
        return _exact_categorical_terms(logits.float())
    raise ValueError(f"fastsel: unknown Fisher mode {mode!r}; choose from {FISHER_MODES}")


def _exact_categorical_terms(z: Tensor) -> list[Tensor]:
    """C - 1 terms v_k . z (z the logits, v_k fixed) with sum_k (d v_k.z)^2 = sum_c p_c (d log p_c)^2.

    d log p_c = J^T (e_c - p), so sum_c p_c (d log p_c)(d log p_c)^T = J^T (diag(p) - p p^T) J; that matrix
    has rank C - 1 (the all-ones vector spans its null space), and its eigen-decomposition
    sum_k lambda_k u_k u_k^T gives v_k = sqrt(lambda_k) u_k: C - 1 backward passes instead of C (one for a
    binary task).
    """
    C = z.shape[1]
    p = torch.softmax(z.detach().double(), dim=-1)
    if C == 2:  # closed form: diag(p) - p p^T = p0 p1 (1, -1)(1, -1)^T
        w = (p[:, 0] * p[:, 1]).sqrt().to(z.dtype)
        return [w * (z[:, 0] - z[:, 1])]
    m = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    evals, evecs = torch.linalg.eigh(m)  # ascending: the first is the null direction (0 up to round-off)
    v = (evecs[:, :, 1:] * evals[:, None, 1:].clamp_min(0).sqrt()).to(z.dtype)  # (B, C, C - 1)
    return [(v[:, :, k] * z).sum(1) for k in range(C - 1)]


def _gaussian_terms(pred: Tensor, labels: Tensor | None, mode: str, noise: Tensor) -> list[Tensor]:
    # log N(y; f, 1) = -(y - f)^2 / 2 + const, so d log p = (y - f) df.
    f = pred.float().reshape(pred.shape[0], -1)[:, 0]
    if mode == "empirical":
        if labels is None:
            raise ValueError("fastsel: the empirical Fisher needs gold labels; use --fisher sampled or exact")
        return [-0.5 * (labels.float().view(-1) - f) ** 2]
    if mode == "sampled":
        # Box-Muller from the example's two uniforms
        eps = (torch.sqrt(-2 * torch.log(noise[:, 0])) * torch.cos(2 * math.pi * noise[:, 1])).to(f)
        return [-0.5 * (f.detach() + eps - f) ** 2]
    if mode == "exact":
        return [f]  # E[(y - f)^2] = 1: the Fisher term is (df)^2
    raise ValueError(f"fastsel: unknown Fisher mode {mode!r}; choose from {FISHER_MODES}")


LIKELIHOODS: dict[str, Likelihood] = {
    "categorical": Likelihood("categorical", _categorical_terms),
    "gaussian": Likelihood("gaussian", _gaussian_terms),
}


def likelihood_for(model: nn.Module) -> Likelihood:
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", 2)
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification":
        raise ValueError("fastsel: multi-label classification heads are not supported by the Fisher scores")
    return LIKELIHOODS["gaussian" if num_labels == 1 or problem == "regression" else "categorical"]


def fisher_terms(
    model: nn.Module, batch: Mapping[str, Tensor], mode: str, seed: int = 0, first_index: int | Tensor = 0
) -> list[Tensor]:
    """Forward ``batch`` through ``model`` and return the per-example terms of its Fisher contribution.

    ``first_index`` is the position of the batch's first example in the data, or a (B,) tensor of each
    example's position (keys the sampled labels).
    """
    return fisher_terms_from_logits(model, logits_of(model(**model_inputs(batch))), batch.get("labels"), mode, seed, first_index)


def fisher_terms_from_logits(
    model: nn.Module, logits: Tensor, labels: Tensor | None, mode: str, seed: int = 0, first_index: int | Tensor = 0
) -> list[Tensor]:
    """The per-example Fisher terms of an already computed forward: logits (B, C) -> list of (B,) tensors.

    ``first_index``: an int (examples first_index..first_index+B-1) or a (B,) tensor of global positions.
    """
    B = logits.shape[0]
    if mode == "sampled":
        if isinstance(first_index, Tensor):
            noise = example_uniforms(seed, 0, B, indices=first_index)
        else:
            noise = example_uniforms(seed, int(first_index), B)
    else:
        noise = torch.empty(0, 2)
    return likelihood_for(model).terms(logits, labels, mode, noise)


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


@dataclass
class FisherResult:
    """diagonal: {param name: F (param shape, float32)}; num_examples: N; mode; fallback_params."""

    diagonal: dict[str, Tensor]
    num_examples: int
    mode: str
    fallback_params: tuple[str, ...] = ()


class FisherAccumulation:
    """The Fisher diagonal of one pass, fed batch by batch: the one driver of the Fisher metric, run by
    :func:`fisher_diagonal` here and by the streamed pass (:mod:`fastsel.pipeline.drivers.fisher`).

    ``capture(batch)`` is entered around the model's forward of the batch, ``consume(batch, outputs)`` turns the
    logits into the likelihood terms and runs the backward inside it. batch: input_ids (B, T), attention_mask
    (B, T), optional token_type_ids, labels (B,), optional index (B,) int64 global example positions (they key
    the labels sampled in "sampled" mode and the groups; default: the order of arrival), optional group (B,) int64
    (each example's group; default index mod K). ``groups`` K > 0 keeps the sums of each group for the ranking
    confidence instead of one sum, of the blocks' parameters
    only (the confidence ranks blocks; embeddings, pooler and head keep one sum: K-fold memory only where it is
    read). A batch sorted by group (the streamed pass sorts them) is split by views, not copies.
    """

    def __init__(self, model: nn.Module, mode: str = "empirical", seed: int = 0, *, groups: int = 0,
                 accumulator: SquaredGradAccumulator | None = None, layer_map: LayerMap | None = None) -> None:
        if mode not in FISHER_MODES:
            raise ValueError(f"fastsel: unknown Fisher mode {mode!r}; choose from {FISHER_MODES}")
        self.model, self.mode, self.seed, self.groups = model, mode, seed, groups
        self.acc = accumulator or SquaredGradAccumulator(model)
        self._grams: tuple[tuple, GroupGrams] | None = None
        if groups:
            layer_map = layer_map or map_layers(model)
            named = layer_map.groups(model)
            accumulated = set(self.acc.param_names)
            self.acc.enable_groups(groups, [n for l in range(layer_map.num_layers) for n in named[f"layer.{l}"]
                                            if n in accumulated])

    def _index(self, batch: Mapping[str, Tensor]) -> Tensor | int:
        return batch["index"] if "index" in batch else self.acc.num_examples

    def capture(self, batch: Mapping[str, Tensor]) -> ContextManager[Any]:
        B = int(batch["input_ids"].shape[0])
        groups = None
        if self.groups:
            index = self._index(batch)
            if not isinstance(index, Tensor):
                index = torch.arange(index, index + B, device=batch["input_ids"].device)
            groups = batch_groups(batch, self.groups, index)
        return self.acc.capture(batch_size=B, groups=groups)

    def consume(self, batch: Mapping[str, Tensor], outputs: Any) -> None:
        terms = fisher_terms_from_logits(self.model, logits_of(outputs), batch.get("labels"), self.mode, self.seed,
                                         self._index(batch))
        self.acc.backward(terms)

    def result(self, release: bool = False) -> FisherResult:
        """The Fisher diagonal so far. release: the accumulator's sums become the diagonal (no copy; the caller's
        last use of this accumulation: it cannot be accumulated into, read or saved again)."""
        if self.acc.num_examples == 0:
            raise ValueError("fastsel: no examples to compute the Fisher information on (empty data)")
        return FisherResult(self.acc.mean(release=release), self.acc.num_examples, self.mode, tuple(sorted(self.acc.fallback_params)))

    def group_scores(self, groups: Sequence[int], layer_map: LayerMap | None = None,
                     group_sums: Sequence[Mapping[str, Tensor]] | None = None,
                     group_counts: Sequence[int] | None = None, aggregate: str = "frobenius") -> list[float]:
        """Block scores (``aggregate``: frobenius, trace or tensor_norm_sum) of the examples of ``groups`` alone.

        From the K x K Gram matrices of the group sums (:class:`GroupGrams`, built once per set of sums and cached):
        any union of groups then costs K^2 numbers per tensor, not a pass over every parameter.
        """
        group_sums = self.acc.group_sums if group_sums is None else group_sums
        group_counts = self.acc.group_counts if group_counts is None else group_counts
        key = (id(group_sums), tuple(group_counts), self.acc.num_examples, id(layer_map))
        if self._grams is None or self._grams[0] != key:
            layer_map = layer_map or map_layers(self.model)
            named = layer_map.groups(self.model)
            blocks = [[n for n in named[f"layer.{l}"] if n in self.acc.group_names] for l in range(layer_map.num_layers)]
            self._grams = (key, GroupGrams(group_sums, group_counts, blocks))
        return self._grams[1].scores(groups, aggregate)


class GroupGrams:
    """Per-tensor K x K Gram matrices (float64) and per-group traces of K group sums.

    For a union S of groups with n_S examples, the block's diagonal is D = (sum_{g in S} X_g) / n_S, so
    sum D^2 = (1 / n_S^2) sum_{a, b in S} <X_a, X_b> and sum D = (1 / n_S) sum_{a in S} sum X_a: one pass over the
    group sums (in chunks, no K-fold copy of a tensor) gives the scores of every union.
    """

    def __init__(self, group_sums: Sequence[Mapping[str, Tensor]], group_counts: Sequence[int],
                 blocks: Sequence[Sequence[str]]) -> None:
        k = len(group_sums)
        self.counts = [int(c) for c in group_counts]
        self.tensor_grams: list[list[Tensor]] = []
        self.traces: list[Tensor] = []
        first = next((g[n] for names in blocks for n in names for g in group_sums[:1]), None)
        device = first.device if first is not None else torch.device("cpu")
        chunk = float64_chunk(device)
        buffer = torch.empty(k, chunk, dtype=torch.float64, device=device)  # reused: no float64 copy of a tensor
        for names in blocks:
            grams, trace = [], torch.zeros(k, dtype=torch.float64, device=device)
            for name in names:
                flat = [g[name].detach().reshape(-1) for g in group_sums]
                gram = torch.zeros(k, k, dtype=torch.float64, device=device)
                for start in range(0, flat[0].numel(), chunk):
                    n = min(chunk, flat[0].numel() - start)
                    x = buffer[:, :n]
                    for row, f in zip(x, flat):
                        row.copy_(f[start:start + n])
                    gram.addmm_(x, x.T)
                    trace += x.sum(1)
                grams.append(gram.cpu())
            self.tensor_grams.append(grams)
            self.traces.append(trace.cpu())

    def scores(self, groups: Sequence[int], aggregate: str = "frobenius") -> list[float]:
        n = sum(self.counts[g] for g in groups)
        if n == 0:
            raise ValueError(f"no examples in groups {list(groups)}")
        idx = torch.tensor(list(groups))
        out = []
        for grams, trace in zip(self.tensor_grams, self.traces):
            squares = [float(g.index_select(0, idx).index_select(1, idx).sum()) for g in grams]
            if aggregate == "frobenius":
                out.append(math.sqrt(max(sum(squares), 0.0)) / n)
            elif aggregate == "trace":
                out.append(float(trace[idx].sum()) / n)
            elif aggregate == "tensor_norm_sum":
                out.append(sum(math.sqrt(max(q, 0.0)) for q in squares) / n)
            else:
                raise ValueError(f"fastsel: no per-group scores for aggregate {aggregate!r}")
        return out


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    mode: str = "empirical",
    seed: int = 0,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = False,
    accumulator: SquaredGradAccumulator | None = None,
) -> FisherResult:
    """Diagonal of the Fisher information of ``model`` over ``batches``, by one batched backward each.

    batches: dicts of tensors (input_ids (B, T), attention_mask (B, T), optional token_type_ids, labels (B,)).
    The model is put in eval mode (no dropout) for the pass and restored after. Returns per-parameter
    diagonals of every trainable parameter. (In memory: the streamed pass runs the same FisherAccumulation.)
    """
    fisher = FisherAccumulation(model, mode, seed, accumulator=accumulator)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model), fisher.acc.hooked(), \
            progress_bar(total=total, desc=f"fisher ({mode})", unit="ex", disable=not progress) as bar:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            B = int(batch["input_ids"].shape[0])
            if B == 0:
                continue
            with fisher.capture(batch):
                fisher.consume(batch, model(**model_inputs(batch)))
            bar.update(B)
    return fisher.result(release=accumulator is None)  # an accumulator of our own is read once: no copy


def float64_chunk(device: torch.device) -> int:
    """Elements of a float32 tensor copied into a float64 buffer at a time: small enough on the CPU to stay in
    cache and to reuse one buffer (a float64 copy of a whole tensor costs fresh pages), large on an accelerator."""
    return 1 << 16 if device.type == "cpu" else 1 << 24


def group_statistics(diagonal: Mapping[str, Tensor], names: Iterable[str]) -> dict[str, float]:
    """{'score': sqrt(sum F^2), 'trace': sum F, 'tensor_norm_sum': sum over tensors of sqrt(sum F^2), 'num_params'}
    over the named parameters (float64 sums)."""
    names = list(names)
    if not names:
        return {"score": 0.0, "trace": 0.0, "tensor_norm_sum": 0.0, "num_params": 0}
    device = diagonal[names[0]].device
    chunk = float64_chunk(device)
    buffer = torch.empty(chunk, dtype=torch.float64, device=device)
    sums = torch.zeros(len(names), 2, dtype=torch.float64, device=device)  # per tensor: sum F^2, sum F
    n = 0
    for i, name in enumerate(names):
        flat = diagonal[name].detach().reshape(-1)
        for start in range(0, flat.numel(), chunk):
            x = buffer[:min(chunk, flat.numel() - start)]
            x.copy_(flat[start:start + x.numel()])
            sums[i, 0] += torch.dot(x, x)
            sums[i, 1] += x.sum()
        n += flat.numel()
    squares, traces = sums.cpu().unbind(1)  # one device sync for the whole group
    sq = [float(t) for t in squares]
    return {"score": math.sqrt(sum(sq)), "trace": float(traces.sum()), "tensor_norm_sum": sum(math.sqrt(t) for t in sq),
            "num_params": n}


def layer_statistics(diagonal: Mapping[str, Tensor], model: nn.Module, layer_map: LayerMap | None = None) -> tuple[list[dict], dict]:
    """Per-block statistics (list over l = 0..L-1) and the unranked extras (embeddings, pooler, head)."""
    layer_map = layer_map or map_layers(model)
    groups = layer_map.groups(model)
    groups = {g: [n for n in names if n in diagonal] for g, names in groups.items()}
    layers = []
    for l in range(layer_map.num_layers):
        stats = group_statistics(diagonal, groups[f"layer.{l}"])
        layers.append({"layer": l, "name": layer_map.block_name(l), **stats})
    extra = {g: group_statistics(diagonal, groups[g]) for g in (EMBEDDINGS, POOLER, HEAD) if groups[g]}
    return layers, extra


def fisher_layer_scores(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    mode: str = "empirical",
    seed: int = 0,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = False,
    layer_map: LayerMap | None = None,
    model_name: str = "",
    task: str = "",
    split: str = "",
) -> tuple["LayerScores", FisherResult]:
    """Fisher layer scores of ``model`` over ``batches``: (LayerScores, the per-parameter FisherResult).

    The LayerScores rank blocks 0..L-1 by sqrt(sum F_j^2) (highest first) and carry trace and parameter
    counts; ``extra`` holds the embeddings, pooler and head, unranked.
    """
    layer_map = layer_map or map_layers(model)
    result = fisher_diagonal(model, batches, mode=mode, seed=seed, device=device, total=total, progress=progress)
    scores = fisher_scores(result, model, layer_map, model_name=model_name, task=task, split=split)
    return scores, result


# How a block's diagonal becomes one number (``--aggregate``); the first is the paper's and the default.
AGGREGATES: dict[str, str] = {
    "frobenius": "sqrt(sum F^2) over the block's parameters (Lodha et al., eq. 1)",
    "trace": "sum F over the block's parameters",
    "tensor_norm_sum": "the sum over the block's tensors of sqrt(sum F^2) (what the public code of Lodha et al. computes)",
    "label_specific": "frobenius with the gold labels / frobenius with permuted labels (the label-dependence subset): "
                      "how much more the labels say about the block than random labels",
}
_STAT_OF = {"frobenius": "score", "trace": "trace", "tensor_norm_sum": "tensor_norm_sum"}


def block_aggregates(layers: Sequence[Mapping[str, float]], permuted_frobenius: Sequence[float] | None = None) -> dict[str, list[float]]:
    """Every aggregate of every block: layers are :func:`layer_statistics` rows; ``label_specific`` needs the
    frobenius scores of the same blocks under permuted labels (left out without them)."""
    out = {name: [float(l[key]) for l in layers] for name, key in _STAT_OF.items()}
    if permuted_frobenius is not None:
        out["label_specific"] = [f / p if p > 0 else (1.0 if f == 0 else f / 1e-300)
                                 for f, p in zip(out["frobenius"], permuted_frobenius)]
    return out


def _finite_or_none(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


def aggregation_summary(aggregates: Mapping[str, Sequence[float]], ranked_by: str) -> dict[str, Any]:
    """scores.json ``aggregations``: each aggregate's block scores and ranking, and Kendall tau-b between the rankings."""
    names = list(aggregates)
    order = {n: sorted(range(len(aggregates[n])), key=lambda l: (-aggregates[n][l], l)) for n in names}
    taus = {f"{a}~{b}": _finite_or_none(kendall_tau_b(aggregates[a], aggregates[b]))
            for i, a in enumerate(names) for b in names[i + 1:]}
    return {"ranked_by": ranked_by, "scores": {n: list(aggregates[n]) for n in names}, "rankings": order, "kendall_tau": taus,
            "definitions": {n: AGGREGATES[n] for n in names}}


def fisher_scores(
    result: FisherResult, model: nn.Module, layer_map: LayerMap | None = None, *, model_name: str = "", task: str = "",
    split: str = "", aggregate: str = "frobenius", permuted_frobenius: Sequence[float] | None = None,
    statistics: tuple[list[dict], dict] | None = None,
) -> "LayerScores":
    """LayerScores of a FisherResult: blocks ranked by ``aggregate`` (default sqrt(sum F_j^2)), every aggregate side by
    side in ``info["aggregations"]``, extras (embeddings, pooler, head) unranked."""

    if aggregate not in AGGREGATES:
        raise ValueError(f"fastsel: unknown --aggregate {aggregate!r}; choose from {sorted(AGGREGATES)}")
    if aggregate == "label_specific" and permuted_frobenius is None:
        raise ValueError("fastsel: --aggregate label_specific needs the label-dependence check (--label-check > 0)")
    # ``statistics``: layer_statistics(result.diagonal, ...) when the caller already computed it (one pass over the
    # diagonal, not two)
    layers, extra = statistics if statistics is not None else layer_statistics(result.diagonal, model, layer_map)
    aggregates = block_aggregates(layers, permuted_frobenius)
    info: dict[str, Any] = {"aggregations": aggregation_summary(aggregates, aggregate)}
    if result.fallback_params:
        info["fallback_params"] = list(result.fallback_params)
    return LayerScores(
        metric="fisher",
        model=model_name or getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
        task=task,
        split=split,
        num_examples=result.num_examples,
        mode=result.mode,
        higher_is_better=True,
        layers=[LayerScore(l["layer"], l["name"], aggregates[aggregate][i], l["num_params"], l["trace"],
                           {name: v[i] for name, v in aggregates.items() if name not in ("trace", aggregate)})
                for i, l in enumerate(layers)],
        extra=extra,
        info=info,
    )
