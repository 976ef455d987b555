"""Provision: the first room of the pipeline, from a family's demands to running nodes.

What it owns: the provider registry and credentials (``registry``, ``credentials``),
the errors at the libcloud boundary (``cloud_errors``), each provider's catalogue and
its cache (``catalogue``), placement (``placement``, pure), a provider's driver shared
by threads (``handle``), create / wait / find / destroy (``nodes``), cooldowns after
capacity and quota errors (``cooldowns``), settling the store against the providers
after a crash (``recovery``), the tags orch writes on cloud resources (``tags``), and
our own libcloud drivers with every driver's declared features (``drivers/``).

Every provider, ours and libcloud's stock drivers alike, is driven through the same
``NodeDriver`` calls; what differs between drivers is asked of their declaration
(``drivers.features_of``), never of their name.
"""
