"""The direction of the imports: the models and inference stand apart from training, and the data and the
models apart from each other (images.py holds what both read)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = {"training", "training_stages", "run_start", "optimization", "loaders", "solver"}


def imported_modules(name):
    """The top-level names of every module that name.py imports, at its top or inside a function."""
    with open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8") as file:
        tree = ast.parse(file.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    return imported


@pytest.mark.parametrize("name", ["captioner", "course_import", "models", "backbones", "config", "datasets"])
def test_models_inference_and_data_import_nothing_of_training(name):
    assert not imported_modules(name) & TRAINING


@pytest.mark.parametrize("name, other", [("models", "datasets"), ("backbones", "datasets"), ("datasets", "models"),
                                         ("datasets", "backbones"), ("images", "datasets"), ("images", "models")])
def test_the_data_and_the_models_do_not_import_each_other(name, other):
    assert other not in imported_modules(name)
