"""Protocol peers of the clouds: small stateful HTTP servers that speak each cloud's
REST API well enough for libcloud's stock driver, each run as its own process on
127.0.0.1.  Their instances are real: each one a local sshd node (``backing``) on a
loopback address, port 22, reported as the instance's public IP."""
