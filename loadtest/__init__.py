"""Load tests of Nexus with locust, against an upstream of known capacity (see loadtest/README.md)."""
