import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # lets suites `import _util`, `import shapes`


def pytest_addoption(parser):
    parser.addoption("--shapes", choices=("default", "anchor", "tiny"), default=None,
                     help="bench shape profile (bench/shapes.py); sets DISTILLKIT_BENCH_SHAPES for the suites")


def pytest_configure(config):
    # before collection, so the suites read the profile when they are imported
    shapes = config.getoption("--shapes", default=None)
    if shapes:
        os.environ["DISTILLKIT_BENCH_SHAPES"] = shapes
