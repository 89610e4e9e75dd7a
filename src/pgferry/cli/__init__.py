"""The ``pgferry`` command: argument parsing and presentation only; the work lives in other packages."""
