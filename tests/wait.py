"""The bound on every wait of the tests, in seconds (for a server, a helper
process, a reply): reached only when something is wrong, never a margin a
passing test depends on."""

WAIT = 20.0
