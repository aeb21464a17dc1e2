"""Per-layer scores: the result every metric produces, its JSON file (scores.json), table and ranking.

scores.json::

    {"metric", "model", "task", "split", "num_examples", "mode",
     "layers": [{"layer": l, "name": ..., "num_params": ..., "score": ..., "trace": ...}, ...],  # l = 0..L-1
     "ranking": [layer indices, best first],
     "extra": {"embeddings": {...}, "head": {...}, ...},
     "ranking_confidence": {"method": "jackknife over K groups of examples", "groups": K, "halves": [[..], [..]],
                            "kendall_tau_halves": tau, "topk_agreement_halves": {"1": .., "2": .., "3": ..},
                            "interval": ..., "layers": [{"layer", "score_interval": [lo, hi],
                                                         "rank_interval": [best, worst]}, ...]}}

(``ranking_confidence``: streamed Fisher and variability runs, see fastsel.scores.confidence; {"method", "groups",
"unavailable": reason} when a subset of the groups cannot be scored.)

Metrics where lower is better (the variability ratio) rank ascending; ``higher_is_better`` says which.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from fastsel.scores.confidence import format_confidence
from fastsel.utils.atomic import atomic_write_json

__all__ = ["LayerScore", "LayerScores"]


@dataclass
class LayerScore:
    layer: int
    name: str
    score: float
    num_params: int | None = None
    trace: float | None = None
    values: dict[str, float] = field(default_factory=dict)  # metric-specific extras (e.g. probe accuracy)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer, "name": self.name}
        if self.num_params is not None:
            d["num_params"] = self.num_params
        d["score"] = self.score
        if self.trace is not None:
            d["trace"] = self.trace
        d.update(self.values)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerScore":
        known = {"layer", "name", "num_params", "score", "trace"}
        score = d["score"]
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise TypeError(f"layer {d.get('layer')}: score {score!r} is not a number")
        return cls(
            layer=int(d["layer"]),
            name=str(d.get("name", f"layer.{d['layer']}")),
            score=float(score),
            num_params=d.get("num_params"),
            trace=d.get("trace"),
            values={k: v for k, v in d.items() if k not in known},
        )


@dataclass
class LayerScores:
    """Scores of blocks 0..L-1 of one model on one task, by one metric."""

    metric: str
    model: str
    task: str
    split: str
    num_examples: int
    layers: list[LayerScore]
    mode: str | None = None
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # anything else worth keeping (l_star, timings, ...)

    def __post_init__(self) -> None:
        idx = [s.layer for s in self.layers]
        if idx != list(range(len(idx))):
            raise ValueError(f"fastsel: layer scores must cover layers 0..L-1 in order, got {idx}")

    @property
    def ranking(self) -> list[int]:
        """Layer indices, best first (ties broken by layer index)."""
        sign = -1.0 if self.higher_is_better else 1.0
        return sorted(range(len(self.layers)), key=lambda l: (sign * self.layers[l].score, l))

    def top(self, k: int) -> list[int]:
        if not 0 <= k <= len(self.layers):
            raise ValueError(f"fastsel: k={k} outside 0..{len(self.layers)}")
        return self.ranking[:k]

    # -- JSON ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "metric": self.metric,
            "model": self.model,
            "task": self.task,
            "split": self.split,
            "num_examples": self.num_examples,
            "mode": self.mode,
            "higher_is_better": self.higher_is_better,
            "layers": [s.to_dict() for s in self.layers],
            "ranking": self.ranking,
            "extra": self.extra,
        }
        d.update(self.info)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerScores":
        core = {"metric", "model", "task", "split", "num_examples", "mode", "higher_is_better", "layers", "ranking", "extra"}
        for key in ("metric", "layers"):
            if key not in d:
                raise ValueError(f"fastsel: not a scores file: missing key {key!r}")
        return cls(
            metric=d["metric"],
            model=d.get("model", ""),
            task=d.get("task", ""),
            split=d.get("split", ""),
            num_examples=int(d.get("num_examples", 0)),
            mode=d.get("mode"),
            higher_is_better=bool(d.get("higher_is_better", True)),
            layers=[LayerScore.from_dict(x) for x in d["layers"]],
            extra=d.get("extra", {}),
            info={k: v for k, v in d.items() if k not in core},
        )

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LayerScores":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def read(cls, path: str | os.PathLike) -> "LayerScores":
        """:meth:`from_json` for files from users: anything that is not a scores.json is a one-line ValueError
        naming the file."""
        try:
            scores = cls.from_json(path)
        except UnicodeDecodeError:
            raise ValueError(f"fastsel: {path}: not a scores.json (not UTF-8 text)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"fastsel: {path}: not a scores.json (malformed JSON: {exc.msg} at line {exc.lineno})") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"fastsel: {path}: not a scores.json ({type(exc).__name__}: {exc})") from None
        except ValueError as exc:  # int()/float() of a field that is not a number; LayerScores' own checks
            raise ValueError(f"fastsel: {path}: not a scores.json ({str(exc).removeprefix('fastsel: ')})") from None
        bad = [s.layer for s in scores.layers if not math.isfinite(s.score)]
        if bad:
            raise ValueError(f"fastsel: {path}: the score of layer(s) {bad} is not a finite number "
                             f"({scores.layers[bad[0]].score}); a ranking cannot use it: score the model again")
        return scores

    # -- display -----------------------------------------------------------------------------------

    def table(self) -> str:
        """A plain-text table: layer, name, parameters, score, trace, rank."""
        rank = {l: r + 1 for r, l in enumerate(self.ranking)}
        has_params = any(s.num_params is not None for s in self.layers)
        has_trace = any(s.trace is not None for s in self.layers)
        conf = self.info.get("ranking_confidence")
        per_layer = {d["layer"]: d for d in conf["layers"]} if isinstance(conf, dict) and "layers" in conf else {}
        head = ["layer", "rank", "score"] + (["+-", "rank interval"] if per_layer else [])
        head += (["trace"] if has_trace else []) + (["params"] if has_params else []) + ["name"]
        rows = []
        for s in self.layers:
            row = [str(s.layer), str(rank[s.layer]), f"{s.score:.6g}"]
            if per_layer:
                lo, hi = per_layer[s.layer]["score_interval"]
                r0, r1 = per_layer[s.layer]["rank_interval"]
                row += [f"{(hi - lo) / 2:.2g}", f"{r0}-{r1}" if r0 != r1 else f"{r0}"]
            if has_trace:
                row.append("" if s.trace is None else f"{s.trace:.6g}")
            if has_params:
                row.append("" if s.num_params is None else f"{s.num_params:,}")
            rows.append(row + [s.name])
        for group, stats in self.extra.items():
            if isinstance(stats, dict) and "score" in stats:
                row = [group, "-", f"{stats['score']:.6g}"] + (["", ""] if per_layer else [])
                if has_trace:
                    row.append(f"{stats['trace']:.6g}" if "trace" in stats else "")
                if has_params:
                    row.append(f"{stats['num_params']:,}" if "num_params" in stats else "")
                rows.append(row + ["(not ranked)"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.rjust(w) if i < len(cells) - 1 else c for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        on = "/".join(x for x in (self.task, self.split) if x)  # scores made without a task (the Python API): none
        title = f"{self.metric} scores of {self.model}" + (f" on {on}" if on else "") + f", N={self.num_examples}"
        title += f", mode={self.mode}" if self.mode else ""
        order = "higher is better" if self.higher_is_better else "lower is better"
        lines = [title + f" ({order})", fmt(head)] + [fmt(r) for r in rows]
        lines.append("ranking (best first): " + " ".join(map(str, self.ranking)))
        if "l_star" in self.info:
            lines.append(f"l* = {self.info['l_star']}")
        if isinstance(conf, dict):

            lines.append(format_confidence(conf))
        head = self.info.get("head")
        if isinstance(head, dict) and head.get("kind") not in (None, "fresh"):
            lines.append(_head_line(head))
        dep = self.info.get("label_dependence")
        if isinstance(dep, dict) and "unavailable" not in dep:
            fresh = not isinstance(head, dict) or head.get("kind") == "fresh"
            lines.append(_label_line(dep, fresh=fresh, few=isinstance(head, dict) and "why_fresh" in head))
        us = self.info.get("until_stable")
        if isinstance(us, dict):
            lines.append(f"until-stable: stable after {us['examples_used']} of {us['examples_available']} examples" if us["stable"]
                         else f"until-stable: reached the end of the data ({us['examples_available']} examples) before "
                              f"the ranking was stable; all of it used")
        return "\n".join(lines)


def _head_line(head: dict[str, Any]) -> str:
    kind = head.get("kind")
    if kind == "probe":
        main = head.get("main_metric", "")
        got = head.get("heldout_metrics", {}).get(main)
        base = head.get("baseline", {}).get(main)
        fmt = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
        return (f"head: probe fitted on {head.get('fit_examples')} examples, held-out {main} {fmt(got)} "
                f"(majority/mean baseline {fmt(base)})")
    if kind == "warmup":
        return f"head: after {head.get('steps')} warm-up steps of full fine-tuning"
    return f"head: from {head.get('path', kind)}"


def _label_line(dep: dict[str, Any], fresh: bool = True, few: bool = False) -> str:
    """``few``: the fresh head was used because too few training examples were left to fit a probe."""
    tau = dep.get("kendall_tau_vs_permuted_labels")
    if dep.get("by_construction"):
        return f"label-free by construction ({dep['by_construction']}): the ranking reflects the model, not the task"
    what = f"Kendall tau vs permuted labels {tau if tau is None else f'{tau:.3f}'} on {dep.get('examples')} examples"
    if dep.get("label_free"):
        hint = " (docs/task_aware.md)"
        if fresh:
            hint = ("; with more training examples than are scored, --head auto fits a probe head (docs/task_aware.md)"
                    if few else "; try --head probe (docs/task_aware.md)")
        return f"label-free ({what}): this ranking reflects the model, not the task{hint}"
    return f"label-dependent ({what}): the labels change this ranking"
