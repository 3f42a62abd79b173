"""Concurrent container-runtime load on graftfs graphs: the CI test (tests/test_load.py) runs it for
a bounded time, tools/soak for as long as asked (load.py holds the load, cli.py the tool)."""
