"""The samplers' names, in a module without torch so that configs and command-line parsers can offer them."""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["ancestral", "first_hitting", "confidence"]
METHODS: tuple[str, ...] = get_args(Method)
