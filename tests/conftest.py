import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread (the export tests use it): small tensors on a shared 2-core
    machine run many times faster than with two."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "heavy: torchvision-zoo checks of 1-3 min each (CI: -m 'slow or heavy')"
    )
    config.addinivalue_line(
        "markers", "huge: torchvision-zoo checks needing 13-19 GB (CI: -m huge, alone)"
    )
    config.addinivalue_line(
        "markers", "large: torchvision-zoo models over 100M parameters (CI: their own process)"
    )


def pytest_collection_modifyitems(config, items):
    """The slow, heavy and huge torchvision-zoo checks run only when asked for with ``-m``:
    CI runs the slow and heavy ones in a step of its own (``pytest -m "slow or heavy"
    tests/test_torchvision_zoo.py``) and the huge ones in another (``-m huge``), so the
    default run (the README's command) leaves them out rather than run them twice.
    Other ``slow`` tests stay in the default run."""
    if config.option.markexpr:
        return
    zoo = [
        item
        for item in items
        if item.path.name == "test_torchvision_zoo.py"
        and any(item.get_closest_marker(m) for m in ("slow", "heavy", "huge"))
    ]
    if zoo:
        config.hook.pytest_deselected(items=zoo)
        dropped = set(zoo)
        items[:] = [item for item in items if item not in dropped]
