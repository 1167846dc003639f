"""The folder of saved draft states a server's prefix caches outlive their
process in (`store.StateStore`): found by the longest common token prefix,
a longer state replacing the ones it extends, the least recently used
dropped beyond the bound, every file checked before its state is used.
The states here are opaque bytes, as they are to the store; the server
tests load real ones."""

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from pyspec_gguf.store import StateStore, write_state, state_path


@pytest.fixture
def draft(tmp_path):
    model = tmp_path / "draft.gguf"
    model.write_bytes(b"weights")
    return SimpleNamespace(path=str(model), sha256=lambda: "a" * 64)


def tokens(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int32)


def test_the_longest_common_prefix_is_found_and_loaded(tmp_path, draft):
    store = StateStore(tmp_path / "states", draft, 2**20)
    store.save(tokens(300), b"three hundred")
    store.save(tokens(400, start=1000), b"another prompt")
    prompt = np.concatenate([tokens(300), tokens(50, start=5000)])
    n, path, saved = store.find(prompt)
    assert n == 300 and len(saved) == 300
    assert store.load(path, saved) == b"three hundred"
    assert store.find(tokens(10, start=9000))[0] == 0


def test_a_longer_state_replaces_the_ones_it_extends(tmp_path, draft):
    store = StateStore(tmp_path, draft, 2**20)
    store.save(tokens(300), b"turn one")
    store.save(tokens(300, start=7), b"another conversation")
    store.save(tokens(700), b"turn two")
    kept = sorted(len(saved) for _, _, saved in (store.find(t) for t in (tokens(700), tokens(300, start=7))))
    assert kept == [300, 700]
    assert len(list(tmp_path.glob("*.psgdoc"))) == 2  # turn one is gone


def test_the_least_recently_used_go_beyond_the_bound(tmp_path, draft):
    size = StateStore(tmp_path / "probe", draft, 2**20).save(tokens(100), bytes(1000)).stat().st_size
    bound = int(2.5 * size)  # room for two files
    store = StateStore(tmp_path, draft, bound)
    for i in range(3):
        store.save(tokens(100, start=1000 * i), bytes(1000))
        time.sleep(0.01)
    assert store.find(tokens(100))[0] == 0  # the first saved went when the third came
    n, path, saved = store.find(tokens(100, start=1000))  # the oldest left, used now: it stays
    assert store.load(path, saved) == bytes(1000)
    store.save(tokens(100, start=5000), bytes(1000))
    left = {int(saved[0]) for saved in (store.find(tokens(100, start=s))[2] for s in (0, 1000, 2000, 5000))
            if saved is not None}
    assert left == {1000, 5000}
    assert sum(f.stat().st_size for f in tmp_path.glob("*.psgdoc")) <= bound


def test_a_state_beyond_the_bound_is_not_saved(tmp_path, draft):
    store = StateStore(tmp_path, draft, 100)
    assert store.save(tokens(300), bytes(1000)) is None
    assert not list(tmp_path.glob("*.psgdoc"))


@pytest.mark.parametrize("damage", ["flip a state byte", "truncate"])
def test_a_damaged_file_is_skipped_and_removed(tmp_path, draft, damage):
    store = StateStore(tmp_path, draft, 2**20)
    path = store.save(tokens(300), b"x" * 500)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    else:
        data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    n, found, saved = store.find(tokens(300))
    assert n == 300
    assert store.load(found, saved) is None
    assert not path.exists()


def test_another_drafts_states_are_not_offered(tmp_path, draft):
    other = SimpleNamespace(path=draft.path, sha256=lambda: "b" * 64)
    StateStore(tmp_path, other, 2**20).save(tokens(300), b"the other draft's")
    assert StateStore(tmp_path, draft, 2**20).find(tokens(300))[0] == 0


def test_a_documents_saved_state_is_found(tmp_path, draft):
    # as Document.save writes it: same folder, same format
    write_state(tmp_path / state_path(tokens(500), draft.path).name, tokens(500), b"document", draft.sha256(), "doc")
    store = StateStore(tmp_path, draft, 2**20)
    n, path, saved = store.find(np.concatenate([tokens(500), tokens(20, start=900)]))
    assert n == 500 and store.load(path, saved) == b"document"


def test_a_missing_folder_is_made_on_first_save(tmp_path, draft):
    store = StateStore(tmp_path / "not" / "yet", draft, 2**20)
    assert store.find(tokens(10))[0] == 0
    assert store.save(tokens(300), b"s").exists()


def test_a_negative_bound_is_refused(tmp_path, draft):
    with pytest.raises(ValueError, match=">= 0"):
        StateStore(tmp_path, draft, -1)
    assert os.listdir(tmp_path) == ["draft.gguf"]
