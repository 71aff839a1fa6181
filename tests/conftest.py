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
        "markers", "heavy: torchvision-zoo checks of minutes each, run only when asked (-m heavy)"
    )


def pytest_collection_modifyitems(config, items):
    """The slow and heavy torchvision-zoo checks run only when asked for with ``-m``: CI
    runs the slow ones in a step of its own (``pytest -m slow
    tests/test_torchvision_zoo.py``), so the default run (the README's command) leaves
    them out rather than run them twice. Other ``slow`` tests stay in the default run."""
    if config.option.markexpr:
        return
    zoo = [
        item
        for item in items
        if item.path.name == "test_torchvision_zoo.py"
        and (item.get_closest_marker("slow") or item.get_closest_marker("heavy"))
    ]
    if zoo:
        config.hook.pytest_deselected(items=zoo)
        dropped = set(zoo)
        items[:] = [item for item in items if item not in dropped]
