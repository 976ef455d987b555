"""Deploy: what goes onto a node and how it is brought up.

``packing`` makes a release folder into a deterministic, checked tarball and keeps
tarballs by sha256; ``releases`` is the catalogue of uploaded ``name@version``
releases; ``bootstrap`` brings one node up over SSH (upload, verify, unpack, build,
setup, health); ``agent_install`` ships the node agent and says where it dials;
``pki`` is the workspace's certificate authority for the agents' mutual TLS.
"""
