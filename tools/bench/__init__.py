"""Benchmarks of scrub-listener, and against glance-scrubber 33.0.0.

Run ``python -m tools.bench --help`` (or ``tox -e bench -- --help``)::

    # scrub-listener alone: 10,000 x 64 KiB images, Glance DB on MariaDB
    python -m tools.bench sweep --backend mysql -n 10000 --size 65536 --pool 8

    # side by side, A B A B, median and spread, ratio
    python -m tools.bench compare -n 1000 --repeat 3

    # scale curves and plots
    python -m tools.bench compare --sizes 1000,10000,100000 --pools 8 \\
        --json results.json --plot docs/performance

    # slow store: 20 ms per delete, what scrub_pool_size buys
    python -m tools.bench compare -n 1000 --pools 1,4,16 --delete-delay 0.02

Every run gets a fresh Glance database (real ``glance-manage db_sync``),
a fresh file store and fresh images (:mod:`tools.bench.workload`), runs the
tool as a child process measured by the kernel (:mod:`tools.bench.measure`)
and checks the outcome; every database it made is dropped again.
"""
