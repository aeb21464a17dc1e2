"""Where the examples come from: a GLUE/SuperGLUE task or a custom CSV/TSV/JSONL file (the settings that
``fastsel score`` and ``fastsel finetune`` share; :class:`DataSettings` is the base of both commands' configs)."""
from __future__ import annotations

from dataclasses import dataclass

from fastsel.data.specs import get_task
from fastsel.utils.settings import comma_list, setting

__all__ = ["DataSettings", "CUSTOM_TASK"]

CUSTOM_TASK = "custom"


@dataclass(kw_only=True)
class DataSettings:
    """The task and, for ``task="custom"``, the file and its columns; validated by :meth:`check_data`."""

    task: str = setting("sst2", "GLUE/SuperGLUE task name, or 'custom' with --data-file")
    data_dir: str | None = setting(None, "folder with glue/ and superglue/ (or a GLUE_DIR); omit to use the hub")
    data_file: str | None = setting(None, "custom CSV/TSV/JSONL file (with --task custom)")
    text_fields: tuple[str, ...] = setting((), "comma-separated text columns of --data-file (one, or two for pairs)",
                                           type=comma_list, metavar="A[,B]")
    label_field: str = setting("label", "label column of --data-file")
    regression: bool = setting(False, "custom data with a real-valued label")

    def check_data(self) -> None:
        """ValueError (one line) for a custom task without its file or columns, an unknown task, and a flag of custom
        data given with another task (it would be ignored)."""
        self.text_fields = comma_list(self.text_fields)
        if self.task == CUSTOM_TASK:
            if not self.data_file or not self.text_fields:
                raise ValueError("fastsel: task 'custom' needs data_file and text_fields (--data-file, --text-fields)")
            if self.data_dir is not None:
                raise ValueError("fastsel: --data-dir does not apply to --task custom (the examples come from --data-file); "
                                 "leave --data-dir out")
            return
        for flag, given in self.custom_flags_given().items():
            if given:
                raise ValueError(f"fastsel: {flag} applies only to --task custom (a CSV/TSV/JSONL --data-file); --task "
                                 f"{self.task} would ignore it: add --task custom, or leave {flag} out")
        get_task(self.task)  # raises for an unknown task

    def custom_flags_given(self) -> dict[str, bool]:
        """{flag: given} of the settings that only custom data reads (subclasses add theirs)."""
        return {"--data-file": self.data_file is not None, "--text-fields": bool(self.text_fields),
                "--label-field": self.label_field != "label", "--regression": bool(self.regression)}
