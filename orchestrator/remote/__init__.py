"""Remote: reaching nodes once they run.

``ssh`` is our SSH layer on paramiko (pinned host keys, one session with its commands
and files, the one translation of paramiko's errors); ``pool`` keeps a session per node
and fans a command out to many; ``fanout`` runs a command on many nodes, through their
agents where the scheduler holds a connection and over SSH for the rest; ``inventory``
writes the fleet out for other tools (Ansible).
"""
