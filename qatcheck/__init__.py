"""qatcheck: accuracy, latency and parity regression harness for INT8 quantization recipes.

The public surface is small on purpose: a :class:`Recipe` describes a model's quantization recipe,
and a pytest suite marked with ``pytest.mark.qatcheck_recipe(recipe)`` gets a ``qcase`` fixture
parametrized over the recipe's modes x backends (see ``qatcheck.plugin``).
"""
from qatcheck.errors import QatcheckError
from qatcheck.recipe import InputSpec, QATSettings, QuantSettings, Recipe, Tolerances, ParityThresholds
from qatcheck.modes import MODES

__version__ = "0.1.0"

__all__ = [
    "MODES", "InputSpec", "ParityThresholds", "QATSettings", "QatcheckError", "QuantSettings",
    "Recipe", "Tolerances", "__version__",
]
