"""The Fisher-diagonal benchmark: the model, the batch, fastsel and its peers, and the agreement check.

Every method maps (model, batch) to the empirical Fisher diagonal of the batch,
F_j = (1/B) sum_b (d log p(y_b | x_b) / d theta_j)**2, as {param name: float32 tensor}; the plain
forward+backward (the floor) computes only the batch gradient and returns None.

Peers (the per-example loop is the oracle the others are checked against):

- ``loop``:   one forward+backward per example (batch of 1).
- ``vmap``:   torch.func: ``vmap(grad(per-example loss))`` over the examples, each example run as an
              unbatched (1, T) call of ``functional_call`` with ``attention_mask=None`` (no padding) and
              eager attention: HF's mask construction and SDPA do not run under vmap.
- ``opacus``: ``opacus.GradSampleModule``; squares and sums ``p.grad_sample``. Given explicit, contiguous
              (B, T) ``position_ids`` and ``token_type_ids``: with HF's default (1, T) position ids the
              per-example gradients of the position embeddings come out summed over the batch
              (``opacus-hf-ids`` shows it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

Diagonal = dict[str, Tensor]
Batch = dict[str, Tensor]


@dataclass(frozen=True)
class BenchConfig:
    """A random BERT classifier and a random, unpadded batch: the benchmark's workload."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    vocab_size: int = 30522
    batch_size: int = 32
    seq_len: int = 64
    num_labels: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if min(self.batch_size, self.seq_len, self.num_layers, self.num_labels - 1) < 1:
            raise ValueError(f"invalid benchmark config {self}")


CPU_CONFIG = BenchConfig()
# BERT-base size on the GPU
GPU_CONFIG = BenchConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, seq_len=128)


def make_model(cfg: BenchConfig, device: str | torch.device = "cpu") -> nn.Module:
    """BertForSequenceClassification with random weights (seeded), eval mode, eager attention."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(cfg.seed)
    config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        num_labels=cfg.num_labels,
        attn_implementation="eager",
        # No dropout: Opacus captures activations only in train mode, so its peer runs in train mode;
        # without dropout that is the same function as eval mode (BERT has no batch statistics).
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).to(device).eval()


def make_batch(cfg: BenchConfig, device: str | torch.device = "cpu") -> Batch:
    """input_ids, attention_mask (all ones: no padding), token_type_ids (B, T) and labels (B,), seeded.

    Position ids are left to the model (HF's (1, T) default) as in real use; peers that need explicit
    per-example ids add them (:func:`with_explicit_ids`).
    """
    g = torch.Generator().manual_seed(cfg.seed + 1)
    B, T = cfg.batch_size, cfg.seq_len
    batch = {
        "input_ids": torch.randint(0, cfg.vocab_size, (B, T), generator=g),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "token_type_ids": torch.randint(0, 2, (B, T), generator=g),
        "labels": torch.randint(0, cfg.num_labels, (B,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def with_explicit_ids(batch: Batch) -> Batch:
    """The batch plus contiguous (B, T) position_ids (and token_type_ids), one row per example."""
    B, T = batch["input_ids"].shape
    out = dict(batch)
    out["position_ids"] = torch.arange(T, device=batch["input_ids"].device).expand(B, T).contiguous()
    out["token_type_ids"] = batch["token_type_ids"].contiguous()
    return out


def _inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k != "labels"}


def log_likelihoods(model: nn.Module, batch: Batch) -> Tensor:
    """(B,) log p(y_b | x_b) of the gold labels: the per-example terms of the empirical Fisher."""
    logits = model(**_inputs(batch)).logits
    return torch.log_softmax(logits.float(), -1).gather(1, batch["labels"].view(-1, 1)).squeeze(1)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


def plain(model: nn.Module, batch: Batch) -> None:
    """The floor: one batched forward + backward of sum_b log p(y_b | x_b) (parameter gradients only)."""
    model.zero_grad(set_to_none=True)
    log_likelihoods(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def fastsel_fisher(model: nn.Module, batch: Batch) -> Diagonal:
    """fastsel: ``fisher_diagonal`` (one batched backward, fused squared-gradient kernels)."""
    from fastsel.scores.fisher import fisher_diagonal

    return fisher_diagonal(model, [batch], mode="empirical").diagonal


def fastsel_fisher_exact(model: nn.Module, batch: Batch) -> Diagonal:
    """fastsel, exact mode (the expectation over every class: C - 1 weighted backward passes)."""
    from fastsel.scores.fisher import fisher_diagonal

    return fisher_diagonal(model, [batch], mode="exact").diagonal


def loop(model: nn.Module, batch: Batch) -> Diagonal:
    """The oracle: one forward + backward per example, gradients squared and summed."""
    params = _trainable(model)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    B = batch["input_ids"].shape[0]
    for b in range(B):
        example = {k: v[b : b + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(log_likelihoods(model, example).sum(), list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                sums[n].add_(g.float().square())
    return {n: s / B for n, s in sums.items()}


def vmap(model: nn.Module, batch: Batch, chunk: int | None = None) -> Diagonal:
    """torch.func: per-example gradients of every parameter by vmap(grad), squared and summed.

    Each example is a (1, T) call with attention_mask=None (the batch has no padding) so HF's mask code,
    which does not run under vmap, is skipped. ``chunk`` bounds the examples vmapped at once (None: all).
    """
    from torch.func import functional_call, grad
    from torch.func import vmap as tvmap

    if not bool(batch["attention_mask"].all()):
        raise ValueError("the vmap peer runs without an attention mask: the batch must have no padding")
    params = {n: p.detach() for n, p in _trainable(model).items()}
    buffers = {n: b for n, b in model.named_buffers()}

    def loss(p: dict[str, Tensor], ids: Tensor, types: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (), {"input_ids": ids[None], "token_type_ids": types[None]}).logits
        return torch.log_softmax(logits.float(), -1)[0].gather(0, label.view(1)).squeeze(0)

    per_example = tvmap(grad(loss), in_dims=(None, 0, 0, 0))
    B = batch["input_ids"].shape[0]
    chunk = chunk or B
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for s in range(0, B, chunk):
        grads = per_example(params, batch["input_ids"][s : s + chunk], batch["token_type_ids"][s : s + chunk], batch["labels"][s : s + chunk])
        for n, g in grads.items():
            sums[n].add_(g.float().square().sum(0))
    return {n: s / B for n, s in sums.items()}


def _opacus(model: nn.Module, batch: Batch) -> Diagonal:
    from opacus import GradSampleModule

    was_training = model.training
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    gsm.train()  # Opacus records activations only in train mode (the model has no dropout)
    try:
        params = _trainable(model)
        log_likelihoods(gsm, batch).sum().backward()
        B = batch["input_ids"].shape[0]
        out = {n: p.grad_sample.float().square().sum(0) / B for n, p in params.items()}
    finally:
        gsm.zero_grad(set_to_none=True)
        gsm._close()  # removes the hooks and the grad_sample attributes: `model` is left as it was
        model.train(was_training)
    return out


def opacus(model: nn.Module, batch: Batch) -> Diagonal:
    """Opacus GradSampleModule with explicit (B, T) position and token-type ids (the correct use)."""
    return _opacus(model, with_explicit_ids(batch))


def opacus_hf_ids(model: nn.Module, batch: Batch) -> Diagonal:
    """Opacus on the batch as HF users pass it (default (1, T) position ids): wrong position embeddings."""
    return _opacus(model, batch)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[nn.Module, Batch], Diagonal | None]
    doc: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("plain", plain, "batched forward+backward (floor)"),
        Method("fastsel", fastsel_fisher, "fastsel.fisher_diagonal"),
        Method("fastsel-exact", fastsel_fisher_exact, "fastsel.fisher_diagonal, exact mode (not the loop's empirical Fisher)"),
        Method("loop", loop, "per-example loop"),
        Method("vmap", vmap, "torch.func vmap(grad)"),
        Method("opacus", opacus, "Opacus GradSampleModule, explicit ids"),
        Method("opacus-hf-ids", opacus_hf_ids, "Opacus GradSampleModule, HF default ids"),
    ]
}


# --------------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------------


def disagreements(
    result: Diagonal, reference: Diagonal, rtol: float = 1e-4, atol_rel: float = 1e-5, zero_rel: float = 1e-14
) -> dict[str, float]:
    """{param: max |result - ref| / max |ref|} for the params where ``result`` fails ``assert_close``.

    atol = atol_rel * max |ref| of the tensor + zero_rel * max |ref| over all tensors. The second term lets
    parameters whose gradient is exactly zero pass: BERT's attention key bias (softmax ignores it) comes
    out as float32 rounding noise (~1e-22 here, squared), different in every method, so a tolerance
    relative to its own max would compare noise with noise.
    """
    floor = zero_rel * max(float(r.abs().max()) for r in reference.values() if r.numel())
    bad = {}
    for n, ref in reference.items():
        got = result.get(n)
        if got is None:
            bad[n] = math.inf
            continue
        ref, got = ref.float().cpu(), got.float().cpu()
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        try:
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol_rel * scale + floor)
        except AssertionError:
            bad[n] = float((got - ref).abs().max()) / max(scale, 1e-30)
    return bad


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
