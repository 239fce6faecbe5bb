"""The base of every config section (its own module: ``storage`` defines one, and ``config`` reads
YAML from storage)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
