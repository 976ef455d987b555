"""Remote: reaching nodes once they run.

``ssh`` is our SSH layer on paramiko (pinned host keys, pooled sessions, fan-out);
``fanout`` runs a command on many nodes, through their agents where the scheduler
holds a connection and over SSH for the rest; ``inventory`` writes the fleet out for
other tools (Ansible).
"""
