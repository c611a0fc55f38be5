"""Enersis node agent: one process per node, `enersis agent --config node.toml`.

Telemetry (this node's only voice to the arbiter):
    hypervisor.py  the small interfaces (Hypervisor, Migrator) and their records
    libvirt_hv.py  the real adapter: libvirt-python, read-only, reconnects with backoff
    simulated.py   the simulated cluster (PlanetLab traces), kept apart from the real adapter
    cpu.py         pure CPU arithmetic (the seed's formula) and the averaging window
    sampler.py     one reading per sample interval on a monotonic schedule
    telemetry.py   NodeOnline / NodeTelemetry / NodeOffline, latest-state-only publishing
    config.py      node.toml
    main.py        the entry point: wiring only
Migration executor: executor.py, migration.py, journal.py, libvirt_migrator.py.
"""
