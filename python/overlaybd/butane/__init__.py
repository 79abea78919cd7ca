"""Butane (flatcar variant) configs that enable the flatcar-overlaybd sysext and wire containerd to it.

`render` turns the Jinja2 templates in the repo's butane/ directory into Butane YAML;
`ignition` checks Butane documents against the schema rules this project relies on and
translates them to Ignition JSON (so `ignition-validate` can check the result).
"""

from .ignition import ButaneError, translate
from .render import VARIABLES, ButaneVarError, holds_secrets, parse_vars, render

__all__ = ["VARIABLES", "ButaneError", "ButaneVarError", "holds_secrets", "parse_vars", "render", "translate"]
