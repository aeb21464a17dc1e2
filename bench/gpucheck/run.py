"""One run of the GPU check: its configuration, its deadline, its JSON (OUT/gpu_check.json, rewritten after every
section so that a crash or a kill leaves the results so far) and the section wrapper that records a section's
status, time and error whatever happens, and whether it broke the CUDA context."""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from .config import make_config
from .harness import cuda_healthy, free


class Run:
    """The state of one gpu_check process: configuration, deadline, the JSON being written (``data``)."""

    def __init__(self, out_dir: Path, dry: bool, device: torch.device, budget_s: float, resume: bool = False) -> None:
        self.out_dir, self.dry, self.device = out_dir, dry, device
        self.cfg = make_config(dry)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.data: dict[str, Any] = {"dry": dry, "device": str(device), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "budget_s": budget_s, "sections": {}}
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "gpu_check.json"
        if resume and self.path.is_file():  # a fresh process after a broken CUDA context: keep what was measured
            try:
                old = json.loads(self.path.read_text())
                self.data = {**old, "sections": old.get("sections", {}), "resumed": old.get("resumed", 0) + 1}
            except ValueError:
                pass

    @property
    def cuda(self) -> bool:
        """Whether this run measures a GPU (else: CPU timings that only exercise the code)."""
        return self.device.type == "cuda"

    def save(self) -> None:
        """Rewrite OUT/gpu_check.json (through a temporary file: a kill never leaves half a JSON)."""
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def section(self, name: str, fn: Callable[["Run", dict], None]) -> None:
        """Run one section; its dict is saved whatever happens (status ok / failed / skipped)."""
        res: dict[str, Any] = {"status": "running"}
        self.data["sections"][name] = res
        share = self.cfg["budget"].get(name, 30)
        res["deadline"] = min(self.deadline, time.monotonic() + share)
        t0 = time.monotonic()
        print(f"\n=== {name} ===", flush=True)
        try:
            if time.monotonic() > self.deadline:
                res["status"] = "skipped (time budget)"
            else:
                fn(self, res)
                if res["status"] == "running":
                    res["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded, the next section runs
            res["status"] = "failed"
            res["error"] = f"{type(exc).__name__}: {exc}"
            res["traceback"] = traceback.format_exc(limit=8)
            print(res["traceback"], flush=True)
        finally:
            res.pop("deadline", None)
            res["seconds"] = round(time.monotonic() - t0, 2)
            free(self.device)
            # GPU_CHECK_FAKE_BROKEN=<section>: pretend that section broke the context (tests the restart on a CPU)
            if not cuda_healthy(self.device) or os.environ.get("GPU_CHECK_FAKE_BROKEN") == name:
                res["cuda_context_broken"] = True
                if not str(res["status"]).startswith("failed"):
                    res["status"] = "failed (CUDA context broken)"
            self.save()
            print(f"--- {name}: {res['status']} ({res['seconds']} s)", flush=True)

    def over(self, res: dict) -> bool:
        """Whether the section owning ``res`` has used up its share of the budget (or the run its whole)."""
        return time.monotonic() > res.get("deadline", self.deadline)
