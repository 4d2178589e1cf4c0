"""Fashion-MNIST suite (optional): skipped with the reason when dataset-fashion-mnist is missing."""
import pytest

from qatcheck.data.fashion_mnist import fashion_mnist_available
from qatcheck.standard import *  # noqa: F401,F403
from qatcheck.zoo.recipes import fashion_recipe

_missing = fashion_mnist_available()
if _missing:
    pytest.skip(_missing, allow_module_level=True)

pytestmark = pytest.mark.qatcheck_recipe(fashion_recipe())

