"""Test and benchmark support: data generation and local servers for pgferry's own tests and benches; never imported by production code paths."""  # noqa: E501
