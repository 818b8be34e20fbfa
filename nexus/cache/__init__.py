"""The HTTP response cache: RFC 9111 rules, keys, the request-path layer, L2 in Redis, purges."""
