"""How many examples does a layer ranking need? The sample-size study of docs/sample_size.md (issue 14).

For every task a pool of P training examples (P = min(split, --pool), drawn at random) is scored once, in
chunks, and every subset score is then computed exactly from per-chunk sufficient statistics:

* Fisher (each mode): the block score is sqrt(sum_j F_j^2) with F = the mean over the subset of the per-example
  squared gradients, which is not additive over examples. With D_c = the per-parameter sum over chunk c
  (``fastsel.scores.fisher.fisher_diagonal`` on that chunk: the fused kernels, nothing re-implemented), the
  score of a union S of chunks is sqrt(1' G_l[S, S] 1) / N with the per-block Gram matrix
  G_l[c, c'] = <D_c, D_c'> over the block's parameters. Chunks hold 4 examples in the first 800 of the pool
  (--small-pool; N = 16 .. 200) and 20 in the whole pool (N = 500 .. 2000; the first 800 re-chunked): a union of random
  chunks of a randomly ordered pool is a uniformly random subset of its size.
* variability: the pooled states of every example and layer (``PooledStates`` from the library's own taps)
  are kept; a subset's ratio is ``variability_layer_scores`` of ``ClassStatistics`` fed only that subset.

For each N (N <= P/2) and each of --subsets random subsets S: Kendall tau-b and top-k overlap of the ranking
on S against the reference ranking on the whole pool (N = P, the largest the study affords) and against the
pool without S (an independent sample: conservative), plus the ranking confidence the library would print
for S (4 groups, jackknife; ``fastsel.scores.confidence.confidence_from_groups``) to test its calibration: do its
95% score and rank intervals hold the reference, and does its tau between halves predict the observed tau?

    PYTHONPATH=$PWD python bench/sample_size.py --data-dir ../shared/data --out bench/sample_size.json
    PYTHONPATH=$PWD python bench/sample_size.py --plot-only --out bench/sample_size.json   # plot + summary

Results are written after every task (``--out``; tasks already there are skipped), the plot to
``docs/sample_size.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastsel.capture.taps import PooledStates  # noqa: E402
from fastsel.data.features import make_dataloader, tokenize_examples  # noqa: E402
from fastsel.data.readers import load_examples  # noqa: E402
from fastsel.data.specs import get_task  # noqa: E402
from fastsel.hf.loading import load_model  # noqa: E402
from fastsel.scores.confidence import confidence_from_groups, kendall_tau_b, topk_agreement  # noqa: E402
from fastsel.scores.fisher import fisher_diagonal  # noqa: E402
from fastsel.scores.variability import ClassStatistics, accumulate_class_statistics, variability_layer_scores

SIZES = (16, 32, 64, 100, 200, 500, 1000, 2000)
MODES = ("empirical", "sampled", "exact")
SMALL_POOL, SMALL_CHUNK, LARGE_CHUNK, GROUPS = 800, 4, 20, 4


def block_names(model, lm) -> list[list[str]]:
    groups = lm.groups(model)
    return [[n for n in groups[f"layer.{l}"]] for l in range(lm.num_layers)]


def chunk_diagonals(model, feats, tok, names, chunk: int, mode: str, seed: int,
                    out: list[torch.Tensor] | None = None, offset: int = 0) -> list[torch.Tensor]:
    """Per block l: (num_chunks, P_l) float32, row c = the per-parameter sum over chunk c of squared gradients
    (written into rows offset.. of ``out`` when given, so that the pool is held once)."""
    n_chunks = len(feats) // chunk
    if out is None:
        out = [torch.empty(n_chunks, sum(model.get_parameter(n).numel() for n in layer)) for layer in names]
    loader = make_dataloader(feats[: n_chunks * chunk], tok, chunk)
    for c, batch in enumerate(loader):
        # a different seed per chunk: the labels sampled in "sampled" mode are independent across chunks
        res = fisher_diagonal(model, [batch], mode=mode, seed=seed * 1_000_003 + offset + c)
        for l, layer in enumerate(names):
            out[l][offset + c] = torch.cat([res.diagonal[n].flatten() for n in layer]) * chunk
    return out


def gram(rows: torch.Tensor, block: int = 1 << 17) -> np.ndarray:
    """rows @ rows.T in float64, a block of columns at a time (no float64 copy of the whole matrix)."""
    g = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64)
    for c in range(0, rows.shape[1], block):
        r = rows[:, c:c + block].double()
        g += r @ r.T
    return g.numpy()


def subset_scores(grams: list[np.ndarray], chunks: np.ndarray, n: int) -> list[float]:
    return [math.sqrt(max(float(g[np.ix_(chunks, chunks)].sum()), 0.0)) / n for g in grams]


def agreement(a, b, higher: bool) -> dict:
    return {"tau": kendall_tau_b(a, b), **{f"top{k}": topk_agreement(a, b, k, higher) for k in (1, 2, 3)}}


def calibration(conf: dict, reference: list[float], ref_ranks: list[int]) -> dict:
    if "unavailable" in conf:
        return {"unavailable": conf["unavailable"]}
    score_in = [lo <= r <= hi for r, d in zip(reference, conf["layers"]) for lo, hi in [d["score_interval"]]]
    # the same interval moved by the jackknife bias estimate: does correcting the bias restore the coverage?
    debiased_in = [lo - d["jackknife_bias"] <= r <= hi - d["jackknife_bias"]
                   for r, d in zip(reference, conf["layers"]) for lo, hi in [d["score_interval"]]]
    rank_in = [r0 <= r <= r1 for r, d in zip(ref_ranks, conf["layers"]) for r0, r1 in [d["rank_interval"]]]
    return {"tau_halves": conf["kendall_tau_halves"], "top1_halves": conf["topk_agreement_halves"].get("1"),
            "score_cover": float(np.mean(score_in)), "score_cover_debiased": float(np.mean(debiased_in)),
            "rank_cover": float(np.mean(rank_in)),
            "mean_rank_width": float(np.mean([d["rank_interval"][1] - d["rank_interval"][0] for d in conf["layers"]]))}


def ranks_of(scores: list[float], higher: bool) -> list[int]:
    order = sorted(range(len(scores)), key=lambda l: ((-1 if higher else 1) * scores[l], l))
    r = [0] * len(scores)
    for pos, l in enumerate(order):
        r[l] = pos + 1
    return r


def study_metric(score_of, n_units: int, unit: int, sizes, pool_n: int, reference, higher: bool,
                 rng: np.random.Generator, subsets: int) -> dict:
    """score_of(unit indices) -> layer scores; subsets of each N are unions of N / unit random units."""
    ref_ranks = ranks_of(reference, higher)
    out = {}
    for n in sizes:
        k = n // unit
        rows = []
        for _ in range(subsets):
            pick = np.sort(rng.choice(n_units, size=k, replace=False))
            s = score_of(pick)
            rest = np.setdiff1d(np.arange(n_units), pick)
            # the library's grouping: unit j of the subset -> group j mod GROUPS (examples by index mod K)
            parts = [pick[g::GROUPS] for g in range(GROUPS)]
            conf = confidence_from_groups(s, lambda gs: score_of(np.sort(np.concatenate([parts[g] for g in gs]))),
                                          GROUPS, higher)
            rows.append({"vs_reference": agreement(s, reference, higher),
                         "vs_rest": agreement(s, score_of(rest), higher) if len(rest) * unit >= n else None,
                         "confidence": calibration(conf, reference, ref_ranks), "ranking": ranks_of(s, higher)})
        out[str(n)] = rows
    return out


def run_task(task: str, args) -> dict:
    spec = get_task(task)
    t0 = time.perf_counter()
    pool = dict(x.split("=") for x in args.pool_for.split(",") if x).get(task, args.pool)
    split = dict(x.split("=") for x in args.split_for.split(",") if x).get(task, "train")
    ex = load_examples(spec, args.data_dir, split, num_examples=int(pool), seed=args.seed)
    model, tok, lm = load_model(args.model, num_labels=spec.num_labels, seed=args.seed)
    feats = tokenize_examples(ex, tok, args.max_length)
    P = len(feats)
    names = block_names(model, lm)
    blocks = {n for layer in names for n in layer}
    for n, p in model.named_parameters():  # only the blocks are ranked: no accumulators, no backward below block 0
        p.requires_grad_(n in blocks)
    small_p = min(args.small_pool, P) // SMALL_CHUNK * SMALL_CHUNK
    large_p = P // LARGE_CHUNK * LARGE_CHUNK
    small_sizes = [n for n in args.sizes if n < 500 and n <= small_p // 2]
    large_sizes = [n for n in args.sizes if n >= 500 and n <= large_p // 2]
    res: dict = {"task": task, "split": split, "pool": P, "small_pool": small_p, "max_length": args.max_length, "num_layers": lm.num_layers,
                 "sizes": small_sizes + large_sizes, "metrics": {}}
    for mode in args.modes:
        tm = time.perf_counter()
        rng = np.random.default_rng(args.seed + 17)
        small = chunk_diagonals(model, feats[:small_p], tok, names, SMALL_CHUNK, mode, args.seed)
        g_small = [gram(r) for r in small]
        per = LARGE_CHUNK // SMALL_CHUNK  # re-chunk the first small_p examples into chunks of 20
        n_first = small_p // LARGE_CHUNK
        large = [torch.empty(large_p // LARGE_CHUNK, r.shape[1]) for r in small]
        for r, big in zip(small, large):
            big[:n_first] = r[: n_first * per].view(n_first, per, r.shape[1]).sum(1)
        del small
        chunk_diagonals(model, feats[n_first * LARGE_CHUNK:large_p], tok, names, LARGE_CHUNK, mode, args.seed + 1,
                        out=large, offset=n_first)
        g_large = [gram(r) for r in large]
        del large
        n_large = g_large[0].shape[0]
        reference = subset_scores(g_large, np.arange(n_large), n_large * LARGE_CHUNK)
        # the small pool is the first small_p examples of the pool; compare it with the same reference
        entry = {"reference": reference, "reference_n": n_large * LARGE_CHUNK, "higher_is_better": True}
        entry["subsets"] = study_metric(lambda c: subset_scores(g_small, c, len(c) * SMALL_CHUNK), g_small[0].shape[0],
                                        SMALL_CHUNK, small_sizes, small_p, reference, True, rng, args.subsets)
        entry["subsets"].update(study_metric(lambda c: subset_scores(g_large, c, len(c) * LARGE_CHUNK), n_large,
                                             LARGE_CHUNK, large_sizes, large_p, reference, True, rng, args.subsets))
        entry["seconds"] = time.perf_counter() - tm
        res["metrics"][f"fisher/{mode}"] = entry
        print(f"{task} fisher/{mode}: {entry['seconds']:.0f}s", flush=True)
    # variability: the pooled states of every example, then exact class statistics of any subset
    tm = time.perf_counter()
    pooled = PooledStates()
    accumulate_class_statistics(model, make_dataloader(feats[:large_p], tok, 32), num_classes=spec.num_labels,
                                layer_map=lm, on_layer=pooled)
    states, labels = pooled.result()
    if len(labels) != large_p:
        raise SystemExit(f"{task}: {large_p - len(labels)} examples had no pooled token")
    states_t = [torch.from_numpy(s) for s in states]
    labels_t = torch.from_numpy(labels).long()

    def var_scores(idx: np.ndarray) -> list[float]:
        st = ClassStatistics(len(states_t), spec.num_labels)
        ii = torch.from_numpy(np.asarray(idx))
        mask = torch.ones(len(ii), 1, dtype=torch.bool)
        for i, s in enumerate(states_t):
            st.update(i, s[ii].unsqueeze(1), mask, labels_t[ii])
        st.num_examples = len(ii)
        try:
            return [l.score for l in variability_layer_scores(st, lm).layers]
        except ValueError:  # a class absent from the subset: no ratio
            return [float("nan")] * lm.num_layers

    reference = var_scores(np.arange(large_p))
    rng = np.random.default_rng(args.seed + 29)
    entry = {"reference": reference, "reference_n": large_p, "higher_is_better": False}
    entry["subsets"] = study_metric(var_scores, large_p, 1, res["sizes"], large_p, reference, False, rng, args.subsets)
    entry["seconds"] = time.perf_counter() - tm
    res["metrics"]["variability"] = entry
    res["seconds"] = time.perf_counter() - t0
    print(f"{task} variability: {entry['seconds']:.0f}s; task {res['seconds']:.0f}s", flush=True)
    return res


# --------------------------------------------------------------------------------------------------
# Summary and plot
# --------------------------------------------------------------------------------------------------


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return (float(np.mean(xs)), float(np.std(xs)), len(xs)) if xs else (float("nan"), float("nan"), 0)


def summary(results: dict) -> dict:
    """Per task, metric and N: mean/std of tau and top-3 overlap vs reference and vs the rest, calibration."""
    out: dict = {}
    for task, r in results["tasks"].items():
        for metric, e in r["metrics"].items():
            for n, rows in e["subsets"].items():
                cal = [x["confidence"] for x in rows if "unavailable" not in x["confidence"]]
                out.setdefault(task, {}).setdefault(metric, {})[n] = {
                    "tau_ref": _mean([x["vs_reference"]["tau"] for x in rows]),
                    "top3_ref": _mean([x["vs_reference"]["top3"] for x in rows]),
                    "top1_ref": _mean([x["vs_reference"]["top1"] for x in rows]),
                    "tau_rest": _mean([x["vs_rest"]["tau"] for x in rows if x["vs_rest"]]),
                    "tau_halves": _mean([c["tau_halves"] for c in cal]),
                    "score_cover": _mean([c["score_cover"] for c in cal]),
                    "rank_cover": _mean([c["rank_cover"] for c in cal]),
                }
    return out


def calibration_table(results: dict) -> dict:
    """Across every subset, overall and per metric family (fisher, variability): corr(tau between halves, tau vs
    reference); mean coverage of the 95% score and rank intervals; outcomes by bins of the predicted tau."""
    pairs: dict[str, list] = {"all": [], "fisher": [], "variability": []}
    for r in results["tasks"].values():
        for metric, e in r["metrics"].items():
            for rows in e["subsets"].values():
                for x in rows:
                    c = x["confidence"]
                    if "unavailable" in c or c["tau_halves"] is None or math.isnan(x["vs_reference"]["tau"]):
                        continue
                    row = (c["tau_halves"], x["vs_reference"]["tau"], c["score_cover"], c["rank_cover"], x["vs_reference"]["top1"],
                           c.get("score_cover_debiased", math.nan))  # nan: results from before the bias estimate
                    pairs["all"].append(row)
                    pairs[metric.split("/")[0]].append(row)
    return {family: _calibration(rows) for family, rows in pairs.items() if rows}


def _calibration(pairs: list) -> dict:
    a = np.asarray(pairs)
    bins = [(-1.01, 0.5), (0.5, 0.8), (0.8, 0.9), (0.9, 1.01)]
    table = []
    for lo, hi in bins:
        m = (a[:, 0] > lo) & (a[:, 0] <= hi)
        if m.any():
            table.append({"tau_halves": [max(lo, -1.0), min(hi, 1.0)], "subsets": int(m.sum()),
                          "tau_reference_mean": float(a[m, 1].mean()), "tau_reference_p10": float(np.quantile(a[m, 1], 0.1)),
                          "top1_reference": float(a[m, 4].mean()), "score_cover": float(a[m, 2].mean()),
                          "score_cover_debiased": float(a[m, 5].mean()), "rank_cover": float(a[m, 3].mean())})
    spearman = float(_spearman(a[:, 0], a[:, 1])) if len(set(a[:, 0])) > 1 and len(set(a[:, 1])) > 1 else None
    return {"subsets": len(a), "spearman_halves_vs_reference": spearman, "score_cover": float(a[:, 2].mean()),
            "score_cover_debiased": float(a[:, 5].mean()), "rank_cover": float(a[:, 3].mean()), "by_tau_halves": table}


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def markdown(results: dict) -> str:
    """Tables for docs/sample_size.md: per task and metric, tau and top-3 overlap vs the reference by N."""
    s = summary(results)
    out = []
    for task, metrics in s.items():
        t = results["tasks"][task]
        out.append(f"**{task}** ({t['split']} split, pool {t['pool']}, max length {t['max_length']})\n")
        sizes = sorted({int(n) for m in metrics.values() for n in m})
        out.append("| metric | reference ranking | " + " | ".join(f"N={n}" for n in sizes) + " |")
        out.append("|---|---|" + "---|" * len(sizes))
        for metric, rows in metrics.items():
            e = t["metrics"][metric]
            ranking = sorted(range(len(e["reference"])), key=lambda l: (-1 if e["higher_is_better"] else 1) * e["reference"][l])
            cells = []
            for n in sizes:
                v = rows.get(str(n))
                cells.append("-" if v is None else f"{v['tau_ref'][0]:.2f}±{v['tau_ref'][1]:.2f} / {v['top3_ref'][0]:.2f}")
            out.append(f"| {metric} | {','.join(map(str, ranking))} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(results)
    tasks = list(results["tasks"])
    metrics = ["fisher/empirical", "fisher/sampled", "fisher/exact", "variability"]
    fig, axes = plt.subplots(2, len(metrics), figsize=(4 * len(metrics), 7), sharex=True, sharey="row")
    for j, metric in enumerate(metrics):
        for task in tasks:
            if metric not in s[task]:
                continue
            ns = sorted(int(n) for n in s[task][metric])
            for i, key in enumerate(("tau_ref", "top3_ref")):
                m = [s[task][metric][str(n)][key][0] for n in ns]
                sd = [s[task][metric][str(n)][key][1] for n in ns]
                axes[i, j].errorbar(ns, m, yerr=sd, marker="o", ms=3, capsize=2, label=task)
        axes[0, j].set_title(metric)
        for i in range(2):
            axes[i, j].set_xscale("log")
            axes[i, j].axvline(100, color="grey", lw=0.8, ls=":")
            axes[i, j].grid(alpha=0.3)
        axes[1, j].set_xlabel("N examples")
    axes[0, 0].set_ylabel("Kendall tau vs reference")
    axes[1, 0].set_ylabel("top-3 overlap vs reference")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2: agreement of the block ranking on N examples with the reference (mean +- std, 10 subsets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--tasks", default="sst2,cola,mrpc,rte,cb,boolq")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--pool", type=int, default=4000, help="examples scored per task (the reference N)")
    p.add_argument("--small-pool", type=int, default=SMALL_POOL,
                   help="examples scored in chunks of 4 (subsets of N < 500); memory ~ small_pool / 4 x the blocks' parameters x 4 bytes")
    p.add_argument("--pool-for", default="boolq=2000", help="per-task pools, e.g. boolq=2000 (long inputs)")
    p.add_argument("--split-for", default="boolq=validation,cb=validation",
                   help="per-task splits: the local BoolQ and CB train files hold 32 examples (FewGLUE)")
    p.add_argument("--subsets", type=int, default=10)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/sample_size.json")
    p.add_argument("--plot", default="docs/sample_size.png")
    p.add_argument("--plot-only", action="store_true", help="no scoring: summary, calibration, plot and tables of --out")
    p.add_argument("--merge", default="", help="comma-separated result files of other runs (other tasks) to merge into --out")
    args = p.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    args.sizes = [int(n) for n in args.sizes.split(",") if n]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"command": " ".join(sys.argv), "model": args.model, "tasks": {}}
    for other in (m for m in args.merge.split(",") if m):
        results["tasks"].update(json.loads(Path(other).read_text())["tasks"])
    if not args.plot_only:
        for task in args.tasks.split(","):
            if task in results["tasks"]:
                continue
            results["tasks"][task] = run_task(task, args)
            out.write_text(json.dumps(results, indent=1))
    results["summary"] = summary(results)
    results["calibration"] = calibration_table(results)
    out.write_text(json.dumps(results, indent=1))
    plot(results, Path(args.plot))
    print(markdown(results))
    print(json.dumps(results["calibration"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
