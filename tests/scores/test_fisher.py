"""Fisher diagonal and layer scores against a per-example loop oracle (batch of one, no hooks)."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from fisher_oracles import assert_diagonals_close, oracle_fisher
from tiny_models import ARCHS, random_batch, tiny_model
from torch import nn
from torch.testing import assert_close

from fastsel.capture.per_example import SquaredGradAccumulator
from fastsel.hf.layer_map import map_layers
from fastsel.ops import backend
from fastsel.ops.backend import BACKEND_ENV, linear_backends_available
from fastsel.scores.fisher import (GroupGrams, fisher_diagonal, fisher_layer_scores, fisher_terms, float64_chunk,
                                   group_statistics, layer_statistics)

MODES = ["empirical", "sampled", "exact"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_per_example_oracle(arch, mode):
    model = tiny_model(arch, num_labels=3)
    batch = random_batch(arch, batch_size=5, seq_len=9, pad_last=2, num_labels=3)
    got = fisher_diagonal(model, [batch], mode=mode)
    assert got.num_examples == 5
    assert_diagonals_close(got.diagonal, oracle_fisher(model, batch, mode))
    # and so every layer score
    want_layers, _ = layer_statistics(oracle_fisher(model, batch, mode), model)
    got_layers, _ = layer_statistics(got.diagonal, model)
    for w, g in zip(want_layers, got_layers):
        assert g["score"] == pytest.approx(w["score"], rel=1e-4)
        assert g["trace"] == pytest.approx(w["trace"], rel=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_regression_gaussian_likelihood(mode):
    model = tiny_model("bert", num_labels=1)
    batch = random_batch("bert", batch_size=4, pad_last=1, num_labels=1)
    got = fisher_diagonal(model, [batch], mode=mode)
    assert_diagonals_close(got.diagonal, oracle_fisher(model, batch, mode))


@pytest.mark.parametrize("num_labels", [2, 3, 5])
def test_exact_mode_is_expectation_over_classes(num_labels):
    """exact = sum_c p_c (d log p_c)^2: compare with explicit per-class empirical passes; C - 1 terms."""
    model = tiny_model("bert", num_labels=num_labels)
    batch = random_batch("bert", batch_size=3, num_labels=num_labels)
    assert len(fisher_terms(model, batch, "exact")) == num_labels - 1
    exact = fisher_diagonal(model, [batch], mode="exact").diagonal
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    manual = {n: torch.zeros_like(t) for n, t in exact.items()}
    for b in range(3):
        for c in range(num_labels):
            one = {k: v[b : b + 1] for k, v in batch.items()}
            one["labels"] = torch.tensor([c])
            emp = fisher_diagonal(model, [one], mode="empirical").diagonal
            for n in manual:
                manual[n] += probs[b, c] * emp[n] / 3
    assert_diagonals_close(exact, manual, rtol=1e-4)


@pytest.mark.parametrize("mode", ["empirical", "sampled"])
def test_batch_size_invariance(mode):
    model = tiny_model("bert", num_labels=2)
    batch = random_batch("bert", batch_size=6, pad_last=3)
    whole = fisher_diagonal(model, [batch], mode=mode, seed=3).diagonal
    for size in (1, 2, 4):
        pieces = [{k: v[s : s + size] for k, v in batch.items()} for s in range(0, 6, size)]
        assert_diagonals_close(fisher_diagonal(model, pieces, mode=mode, seed=3).diagonal, whole, rtol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_padding_invariance(arch):
    model = tiny_model(arch)
    batch = random_batch(arch, batch_size=4, seq_len=8)
    pad_id = 1 if arch == "roberta" else 0
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.full((4, 5), pad_id)], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(4, 5, dtype=torch.long)], 1),
        "labels": batch["labels"],
    }
    assert_diagonals_close(fisher_diagonal(model, [padded]).diagonal, fisher_diagonal(model, [batch]).diagonal, rtol=1e-5)


def test_position_and_token_type_embeddings_are_per_example():
    """HF passes position_ids (1, T) and expanded token_type_ids: without per-example expansion their
    squared gradients would be the square of the batch SUM (Opacus's error)."""
    model = tiny_model("bert")
    batch = random_batch("bert", batch_size=5)
    got = fisher_diagonal(model, [batch]).diagonal
    want = oracle_fisher(model, batch, "empirical")
    for name in ("bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"):
        assert_close(got[name], want[name], rtol=1e-4, atol=1e-12)


def test_layer_score_is_frobenius_norm_of_the_diagonal():
    model = tiny_model("bert", num_layers=4)
    batch = random_batch("bert", batch_size=4)
    scores, result = fisher_layer_scores(model, [batch], model_name="tiny", task="t", split="s")
    lm = map_layers(model)
    groups = lm.groups(model)
    for s in scores.layers:
        names = groups[f"layer.{s.layer}"]
        flat = torch.cat([result.diagonal[n].double().reshape(-1) for n in names])
        assert s.score == pytest.approx(math.sqrt(float(flat.square().sum())), rel=1e-9)
        assert s.trace == pytest.approx(float(flat.sum()), rel=1e-9)
        assert s.num_params == flat.numel()
    assert scores.ranking == sorted(range(4), key=lambda l: -scores.layers[l].score)
    assert set(scores.extra) == {"embeddings", "pooler", "head"}
    d = scores.to_dict()
    assert [x["layer"] for x in d["layers"]] == [0, 1, 2, 3] and d["metric"] == "fisher" and d["mode"] == "empirical"


# -- the backend on plain torch modules -------------------------------------------------------------


class Scale(nn.Module):
    """A layer type fastsel has no rule for: served by the generic torch.func rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.gain + self.shift)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.scale = Scale(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.scale(self.norm(self.emb(ids))).mean(1))


def test_backend_on_a_plain_torch_module():
    torch.manual_seed(0)
    net = TinyNet()
    ids = torch.randint(0, 6, (7, 5))  # repeated tokens and padding rows
    labels = torch.randint(0, 3, (7,))

    def terms(x, y):
        return [torch.log_softmax(net(x), -1).gather(1, y[:, None]).squeeze(1)]

    acc = SquaredGradAccumulator(net)
    with acc.capture(batch_size=7):
        acc.backward(terms(ids, labels))
    want = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for b in range(7):
        grads = torch.autograd.grad(terms(ids[b : b + 1], labels[b : b + 1])[0].sum(), list(net.parameters()))
        for n, g in zip(want, grads):
            want[n] += g.square()
    assert_diagonals_close(acc.mean(), {n: w / 7 for n, w in want.items()})
    assert not acc.fallback_params


def test_weight_shared_across_calls_is_combined_per_example():
    """A Linear called twice on the examples: its two calls' per-example gradients add up before squaring."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    head = nn.Linear(4, 2)
    x = torch.randn(5, 4)
    y = torch.randint(0, 2, (5,))

    def terms(x, y):
        return [torch.log_softmax(head(lin(torch.relu(lin(x)))), -1).gather(1, y[:, None]).squeeze(1)]

    model = nn.ModuleDict({"lin": lin, "head": head})
    acc = SquaredGradAccumulator(model)
    with acc.capture(batch_size=5):
        acc.backward(terms(x, y))
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for b in range(5):
        grads = torch.autograd.grad(terms(x[b : b + 1], y[b : b + 1])[0].sum(), list(model.parameters()))
        for n, g in zip(want, grads):
            want[n] += g.square()
    assert_diagonals_close(acc.mean(), {n: w / 5 for n, w in want.items()})
    assert not acc.fallback_params


# -- batch-shared parameters (relative positions): captured where they meet the examples, no fallback ----

DEBERTA_VARIANTS = {
    "share-c2p-p2c": dict(share_att_key=True, pos_att_type=["p2c", "c2p"]),
    "own-c2p-p2c": dict(share_att_key=False, pos_att_type=["p2c", "c2p"]),
    "own-c2p": dict(share_att_key=False, pos_att_type=["c2p"]),
    "share-p2c": dict(share_att_key=True, pos_att_type=["p2c"]),
    "no-rel-norm": dict(norm_rel_ebd="none"),
}


@pytest.mark.parametrize("variant", list(DEBERTA_VARIANTS))
@pytest.mark.parametrize("mode", MODES)
def test_deberta_relative_attention_without_fallback(variant, mode):
    model = tiny_model("deberta-v2", num_labels=3, **DEBERTA_VARIANTS[variant])
    batch = random_batch("deberta-v2", batch_size=5, seq_len=9, pad_last=2, num_labels=3)
    got = fisher_diagonal(model, [batch], mode=mode)
    assert got.fallback_params == ()
    assert_diagonals_close(got.diagonal, oracle_fisher(model, batch, mode))


@pytest.mark.parametrize("arch", ARCHS)
def test_no_parameter_needs_the_fallback(arch):
    model = tiny_model(arch, num_labels=2)
    batch = random_batch(arch, batch_size=4, pad_last=1)
    assert fisher_diagonal(model, [batch]).fallback_params == ()


def test_capture_off_gives_the_old_exact_fallback():
    """capture_shared=False: the shared parameters take the per-example loop, with the same result."""
    model = tiny_model("deberta-v2", num_labels=3)
    batch = random_batch("deberta-v2", batch_size=4, pad_last=1, num_labels=3)
    fast = fisher_diagonal(model, [batch])
    old = fisher_diagonal(model, [batch], accumulator=SquaredGradAccumulator(model, capture_shared=False))
    assert fast.fallback_params == ()
    assert "deberta.encoder.rel_embeddings.weight" in old.fallback_params
    assert_diagonals_close(old.diagonal, fast.diagonal, rtol=1e-5)


def test_fisher_diagonal_spends_only_its_own_accumulator():
    """Without an accumulator the result is the accumulator's sums divided in place; a given one stays readable."""
    model = tiny_model("bert", num_labels=3)
    batch = random_batch("bert", batch_size=4, pad_last=1, num_labels=3)
    given = SquaredGradAccumulator(model)
    mine = fisher_diagonal(model, [batch])
    theirs = fisher_diagonal(model, [batch], accumulator=given)
    assert_diagonals_close(theirs.diagonal, mine.diagonal, rtol=1e-6)
    assert not given.released
    assert_diagonals_close(given.mean(), mine.diagonal, rtol=1e-6)


def _numpy_statistics(tensors: list[torch.Tensor]) -> dict[str, float]:
    sq = [float(np.sum(t.double().numpy() ** 2)) for t in tensors]
    return {"score": math.sqrt(sum(sq)), "trace": float(sum(np.sum(t.double().numpy()) for t in tensors)),
            "tensor_norm_sum": sum(math.sqrt(q) for q in sq), "num_params": sum(t.numel() for t in tensors)}


def test_group_statistics_over_several_chunks_match_numpy():
    chunk = float64_chunk(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    diagonal = {"big": torch.rand(2 * chunk + 17, generator=gen) * 1e-3, "small": torch.rand(3, 5, generator=gen),
                "exact": torch.rand(chunk, generator=gen)}
    got = group_statistics(diagonal, list(diagonal))
    want = _numpy_statistics(list(diagonal.values()))
    assert got["num_params"] == want["num_params"]
    for k in ("score", "trace", "tensor_norm_sum"):
        assert got[k] == pytest.approx(want[k], rel=1e-12)
    assert group_statistics(diagonal, []) == {"score": 0.0, "trace": 0.0, "tensor_norm_sum": 0.0, "num_params": 0}


def test_group_grams_over_several_chunks_match_numpy():
    chunk = float64_chunk(torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    k = 3
    sums = [{"w": torch.rand(chunk + 5, 2, generator=gen), "b": torch.rand(7, generator=gen)} for _ in range(k)]
    counts = [4, 5, 6]
    grams = GroupGrams(sums, counts, [["w", "b"], ["b"]])
    for groups in ([0], [1, 2], [0, 1, 2]):
        n = sum(counts[g] for g in groups)
        union = {name: sum(sums[g][name].double() for g in groups) / n for name in ("w", "b")}
        got = grams.scores(groups, "frobenius")
        want = [_numpy_statistics([union["w"], union["b"]])["score"], _numpy_statistics([union["b"]])["score"]]
        assert got == pytest.approx(want, rel=1e-12)
        assert grams.scores(groups, "trace") == pytest.approx(
            [_numpy_statistics([union["w"], union["b"]])["trace"], _numpy_statistics([union["b"]])["trace"]], rel=1e-12)
        assert grams.scores(groups, "tensor_norm_sum") == pytest.approx(
            [_numpy_statistics([union["w"], union["b"]])["tensor_norm_sum"],
             _numpy_statistics([union["b"]])["tensor_norm_sum"]], rel=1e-12)


def test_deberta_batch_of_one_and_batch_size_invariance():
    model = tiny_model("deberta-v2", num_labels=2)
    batch = random_batch("deberta-v2", batch_size=6, pad_last=2)
    whole = fisher_diagonal(model, [batch]).diagonal
    for size in (1, 4):
        pieces = [{k: v[s : s + size] for k, v in batch.items()} for s in range(0, 6, size)]
        got = fisher_diagonal(model, pieces)
        assert got.fallback_params == ()
        assert_diagonals_close(got.diagonal, whole, rtol=1e-5)


def test_deberta_padding_invariance():
    model = tiny_model("deberta-v2")
    batch = random_batch("deberta-v2", batch_size=4, seq_len=8)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.zeros(4, 5, dtype=torch.long)], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(4, 5, dtype=torch.long)], 1),
        "labels": batch["labels"],
    }
    assert_diagonals_close(fisher_diagonal(model, [padded]).diagonal, fisher_diagonal(model, [batch]).diagonal, rtol=1e-5)


def test_shared_capture_with_several_chunks(monkeypatch):
    """The batched vector-Jacobian product cut into chunks of examples gives the same diagonal."""
    import fastsel.capture.per_example as pe

    model = tiny_model("deberta-v2", num_labels=3)
    batch = random_batch("deberta-v2", batch_size=5, pad_last=2, num_labels=3)
    whole = fisher_diagonal(model, [batch], mode="exact").diagonal
    monkeypatch.setattr(pe, "SHARED_WORKSPACE_BYTES", 1)  # one example at a time
    assert_diagonals_close(fisher_diagonal(model, [batch], mode="exact").diagonal, whole, rtol=1e-5)


# -- bad input -------------------------------------------------------------------------------------


def test_errors():
    model = tiny_model("bert")
    batch = random_batch("bert")
    with pytest.raises(ValueError, match="unknown Fisher mode"):
        fisher_diagonal(model, [batch], mode="diagonal")
    with pytest.raises(ValueError, match="no examples"):
        fisher_diagonal(model, [])
    unlabeled = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="needs gold labels"):
        fisher_diagonal(model, [unlabeled], mode="empirical")
    fisher_diagonal(model, [unlabeled], mode="exact")  # needs no labels
    frozen = tiny_model("bert").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fisher_diagonal(frozen, [batch])


def test_model_mode_is_restored():
    model = tiny_model("bert").train()
    fisher_diagonal(model, [random_batch("bert")])
    assert model.training


@pytest.mark.slow
def test_real_minilm_on_sst2_matches_oracle(minilm_path, data_dir):
    from fastsel.data.features import make_dataloader, tokenize_examples
    from fastsel.data.readers import load_examples
    from fastsel.hf.loading import load_model

    model, tok, _ = load_model(minilm_path, num_labels=2, seed=0)
    ex = load_examples("sst2", data_dir, "train", num_examples=4, seed=1)
    batch = next(iter(make_dataloader(tokenize_examples(ex, tok, 32), tok, batch_size=4)))
    batch = {k: v for k, v in batch.items() if k != "special_tokens_mask"}
    got = fisher_diagonal(model, [batch], mode="exact").diagonal
    assert_diagonals_close(got, oracle_fisher(model, batch, "exact"), rtol=2e-4)


def test_reference_backend_gives_the_same_fisher(monkeypatch):
    """Without the compiled extension everything runs on the *_ref twins, with the same result."""
    model = tiny_model("bert")
    batch = random_batch("bert", batch_size=4, pad_last=1)
    kernel = fisher_diagonal(model, [batch]).diagonal
    monkeypatch.setattr(backend, "EXTENSION", backend.ExtensionStatus(False, False, "test"))
    assert backend.op_backend("accumulate_linear_sq_grad", "cpu")[0] == "reference"
    assert_diagonals_close(fisher_diagonal(model, [batch]).diagonal, kernel, rtol=1e-5)


# -- the CUDA path, end to end (runs where a GPU and the CUDA kernels are; `-k cuda` selects it) --------


CUDA_LINEAR_BACKENDS = [b for b in linear_backends_available("cuda") if b != "reference"] if torch.cuda.is_available() else []


@pytest.mark.parametrize("backend", [pytest.param(b, id=f"cuda-{b}") for b in CUDA_LINEAR_BACKENDS])
@pytest.mark.parametrize("arch", ["bert", "deberta-v2", "distilbert"])
def test_cuda_fisher_matches_the_cpu_oracle(arch, backend, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, f"accumulate_linear_sq_grad={backend}")
    model = tiny_model(arch, num_labels=3)
    batch = random_batch(arch, batch_size=6, seq_len=11, pad_last=2, num_labels=3)
    want = oracle_fisher(model, batch, "empirical")
    got = fisher_diagonal(model.cuda(), [batch], mode="empirical").diagonal
    assert_diagonals_close({n: t.cpu() for n, t in got.items()}, want, rtol=2e-4)


@pytest.mark.parametrize("backend", [pytest.param(b, id=f"cuda-{b}") for b in CUDA_LINEAR_BACKENDS])
def test_cuda_fisher_under_bf16_autocast_is_close_to_fp32(backend, monkeypatch):
    """Mixed operands (fp32 LayerNorm outputs, bf16 output gradients) take the half path; layer scores stay close."""
    monkeypatch.setenv(BACKEND_ENV, f"accumulate_linear_sq_grad={backend}")
    model = tiny_model("bert", num_labels=2, hidden_size=64, intermediate_size=128, num_attention_heads=4).cuda()
    batch = random_batch("bert", batch_size=8, seq_len=24, num_labels=2)
    exact = fisher_diagonal(model, [batch]).diagonal
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = fisher_diagonal(model, [batch]).diagonal
    want, _ = layer_statistics({n: t.cpu() for n, t in exact.items()}, model)
    got, _ = layer_statistics({n: t.cpu() for n, t in half.items()}, model)
    for w, g in zip(want, got):
        assert math.isfinite(g["score"])
        assert g["score"] == pytest.approx(w["score"], rel=0.05)
