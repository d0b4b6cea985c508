"""What every config module shares: the section base (unknown keys refused), paths expanded
alike, and a run name that stays inside the root. The validators raise ValueError, which the
config turns into one sentence."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: an unknown key is an error, and so is a bad value assigned later."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _expand_path(text: str) -> str:
    """`~` and `$VARS` expanded, in every path field alike (an HF id has neither); an unset
    variable is refused rather than kept as a literal folder name."""
    expanded = os.path.expanduser(os.path.expandvars(text))
    unset = re.search(r"\$(\w+|\{[^}]*\})", expanded)
    if unset and unset.group(0) in text:
        raise ValueError(f"environment variable {unset.group(0)} is not set")
    return expanded


def _inside_the_root(name: str) -> str:
    if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts or name == ".":
        raise ValueError(
            "must be a folder name inside run.root (not absolute, no '..'); set run.root "
            "to put runs elsewhere"
        )
    return name


# A field that names a file, folder, glob or HF id.
PathText = Annotated[str, AfterValidator(_expand_path)]
# run.name: <root>/<name> must stay under the root.
RunName = Annotated[str, AfterValidator(_inside_the_root)]
