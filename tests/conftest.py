"""Shared fixtures. Models come from the registry into the one cache
directory (PYSPEC_GGUF_CACHE or ~/.cache/pyspec-gguf), fetched once."""

import contextlib
import os

import pytest

import pyspec_gguf
from pyspec_gguf import SpecSession
from pyspec_gguf import registry
from pyspec_gguf.speed import BOOK_ENV
from pyspec_gguf.store import STATES_ENV

SMALL = "smollm2-135m-instruct-q4_1"


@contextlib.contextmanager
def environ(name: str, value: str):
    """The environment variable `name` set to `value` (for this process and
    the ones it starts) until the block ends."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@pytest.fixture(scope="session", autouse=True)
def speeds_file(tmp_path_factory):
    """The models' measured speeds (method="auto") in a file of the test
    run's own, shared by its tests, never the user's cache."""
    path = tmp_path_factory.mktemp("speeds") / "speeds.json"
    with environ(BOOK_ENV, str(path)):
        yield path


@pytest.fixture(scope="session", autouse=True)
def states_folder(tmp_path_factory):
    """Saved draft states (documents, servers) in a folder of the test run's
    own, never the user's cache: a server started by one test must not find
    the states another test's server saved."""
    path = tmp_path_factory.mktemp("states")
    with environ(STATES_ENV, str(path)):
        yield path


@pytest.fixture(scope="session")
def small_path():
    return registry.fetch(SMALL, progress=False)


@pytest.fixture(scope="session")
def small(small_path):
    with pyspec_gguf.Model(small_path) as model:
        yield model


@pytest.fixture(scope="session")
def small_pair(small_path):
    """SmolLM2 as both draft and target: every method's code path, fast."""
    with SpecSession(draft=str(small_path), target=str(small_path), progress=False) as session:
        yield session


@pytest.fixture(scope="session")
def exact_pair(small_path):
    """SmolLM2 as both, flash attention off: answers computed over
    differently laid out caches agree to the last bit only without it."""
    with SpecSession(draft=str(small_path), target=str(small_path), flash_attn="off", progress=False) as session:
        yield session


@pytest.fixture(scope="session")
def draft():
    with pyspec_gguf.Model(registry.default_model("draft"), progress=False) as model:
        yield model


@pytest.fixture(scope="session")
def target():
    with pyspec_gguf.Model(registry.default_model("target"), progress=False) as model:
        yield model


@pytest.fixture(scope="session")
def prose():
    """A few hundred words of plain English, enough for a small prompt."""
    sentences = [
        "The river ran past the old mill, where the miller kept a ledger of every sack of grain.",
        "In spring the water rose and the wheel turned faster than the men could carry the flour.",
        "Children from the village came to watch the stones grind, and the miller told them stories.",
        "One story was about a fox that learned to count by watching the sacks pile up in the yard.",
        "Another was about a storm that stopped the wheel for a week and left the whole valley hungry.",
        "The miller's daughter wrote the stories down in a blue notebook that she kept under her bed.",
    ]
    return " ".join(sentences * 4)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    loaded = []

    def refuse(spec, *args, **kwargs):
        loaded.append(spec)
        raise AssertionError(f"a model was loaded: {spec}")
    monkeypatch.setattr(pyspec_gguf.session, "Model", refuse)
    return loaded
