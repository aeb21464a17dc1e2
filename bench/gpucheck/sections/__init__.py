"""The sections of the GPU check, in the order a run takes them. Each is ``section(run, res)``: it fills its own
``res`` dict (saved in OUT/gpu_check.json under ``sections``) and may set ``res["status"]``; an exception marks
it failed and the next section runs."""
from __future__ import annotations

from typing import Callable

from ..run import Run
from .env import section_env
from .error import section_error
from .fisher import section_fisher
from .fisher_pass import section_fisher_pass
from .gemm import section_gemm
from .linear import section_linear
from .profiling import section_profile
from .variability import section_variability

SECTIONS: dict[str, Callable[[Run, dict], None]] = {
    "env": section_env,
    "gemm": section_gemm,
    "linear": section_linear,
    "error": section_error,
    "fisher": section_fisher,
    "fisher_pass": section_fisher_pass,
    "variability": section_variability,
    "profile": section_profile,
}
