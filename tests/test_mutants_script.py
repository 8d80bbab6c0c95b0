"""scripts/mutants.py's list of mutants is well formed, checked against the current tree without running any mutant
(no copy, no build, no kernel): fast.

Every mutation must apply (its `old` text occurs exactly once in its file, and `new` differs), names are unique,
there are at least 12 mutants, across the three op families and both the Triton and the C++ backends, and every
mutant names tests whose files and test functions exist.
"""
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("mmkern_mutants_script", REPO / "scripts" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


mutants_script = _load()
MUTANTS = mutants_script.MUTANTS


def test_at_least_twelve_mutants_with_unique_names():
    names = [m.name for m in MUTANTS]
    assert len(names) >= 12, f"only {len(names)} mutants"
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"mutant names used twice: {duplicates}"


def test_every_family_and_both_backends_are_mutated():
    assert {m.family for m in MUTANTS} == set(mutants_script.FAMILIES)
    files = {m.path for m in MUTANTS}
    assert any(f.startswith("mmkern/triton/") and f.endswith(".py") for f in files), "no Triton kernel mutated"
    assert any(f.startswith("csrc/") and f.endswith((".cpp", ".h")) for f in files), "no C++ kernel mutated"
    for family in mutants_script.FAMILIES:
        backends = {m.backend for m in MUTANTS if m.family == family}
        assert "triton" in backends, f"no Triton mutant in the {family} family"


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutation_applies_exactly_once(mutant):
    path = REPO / mutant.path
    assert path.is_file(), f"{mutant.name}: no file {mutant.path}"
    text = path.read_text()
    assert text.count(mutant.old) == 1, (f"{mutant.name}: `old` occurs {text.count(mutant.old)} times in "
                                         f"{mutant.path} (must be exactly once)")
    assert mutant.new != mutant.old and text.replace(mutant.old, mutant.new) != text
    assert mutant.what and "\n" not in mutant.what, f"{mutant.name}: `what` must be one line"
    assert mutant.family in mutants_script.FAMILIES
    assert mutant.rebuild or mutant.backend == "c++", f"{mutant.name}: rebuild=False means nothing for Python"


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_names_existing_tests(mutant):
    assert mutant.tests, f"{mutant.name}: no tests"
    for node in mutant.tests:
        file, _, rest = node.partition("::")
        assert (REPO / file).is_file() and file.startswith("tests/test_"), f"{mutant.name}: no test file {file}"
        function = re.split(r"[\[:]", rest)[0]
        assert re.search(rf"^\s*def {re.escape(function)}\(", (REPO / file).read_text(), re.M), (
            f"{mutant.name}: {file} has no test {function}")


def test_cxx_mutants_group_by_translation_unit():
    """The C++ pipeline rebuilds once per mutant; a switch between units recompiles the restored one too."""
    cxx = [m for m in MUTANTS if m.backend == "c++" and m.rebuild]
    units = [m.path for m in cxx]
    switches = sum(1 for a, b in zip(units, units[1:]) if a != b)
    assert switches == len(dict.fromkeys(units)) - 1, f"C++ mutants interleave their files: {units}"
