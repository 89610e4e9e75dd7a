"""The one compiled part of pgferry: the snapshot's COPY-text-to-JSON conversion (``pgferry.sync._copyjson``).

Everything else is configured in ``pyproject.toml``. The extension is optional: without a C compiler the install
still succeeds and the dev sync server uses the pure-Python conversion (``pgferry.sync.copytext``), about ten times
slower per row; ``pgferry.sync.copytext.ACCELERATED`` says which one runs.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pgferry.sync._copyjson",
            ["src/pgferry/sync/_copyjson.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
