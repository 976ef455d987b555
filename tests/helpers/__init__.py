"""What the tests (and the benches in ``bench/``) share, one module per concept.

Test modules import helpers from here, never from another test module or a conftest;
conftest.py files hold fixtures only (built on these helpers).

===================  ===========================================================================
``workspace``        REPO, file_digest, sample workspaces (the primes release, local nodes), stop
``cli``              Run (the in-process CLI's outcome), ``orch`` as a subprocess
``native``           worker_native (orch-port, libfaults.so) and the primes library, built
``primes``           Python references for the primes release's work functions
``processes``        processes of a local node, of a command line; is a pid alive
``keys``             ed25519 key pairs for the fleet
``local_nodes``      destroying every node of a local driver and proving nothing is left
``netns``            namespaces, links and free subnets for netns nodes, and their leftovers
``net``              a free TCP port on 127.0.0.1
``serving``          a real ``orch serve`` subprocess with a client
``ansible``          the real ``ansible`` with folders of its own, host keys checked
``agent_peer``       a scheduler stand-in speaking the agent protocol over mutual TLS
``agent``            an agent's home as bootstrap lays it out, and talking to it
``moto_ec2``         libcloud's EC2 driver against moto (an ``ORCH_DRIVER_PLUGINS`` plugin)
``ec2_faults``       a fault-injecting proxy in front of moto
``postgres``         the machine's PostgreSQL cluster, administered for tests
``import_contracts`` an import-linter contract type (``stdlib_only``) for .importlinter
===================  ===========================================================================

Keep this package light: ``moto_ec2`` is imported by ``orch`` subprocesses.
"""
