pytest_plugins = ["pgferry.testing.pytest_plugin"]
