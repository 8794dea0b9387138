"""Registers the `tpu_compile` marker (until pyproject.toml lists it beside `gpu_compile`)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "tpu_compile: deviceless Mosaic compile of the Pallas TPU kernels (needs libtpu)")
